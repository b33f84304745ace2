"""LLaVA-style models (transformers models/llava/modeling_llava.py, `LlavaForConditionalGeneration`): a CLIP or
Pixtral vision tower, the 2-layer GELU projector and a LLaMA-family language model (LLaVA-1.5: Vicuna/LLaMA-2,
LLaVA-LLaMA-3: Llama-3, Pixtral-12B: Mistral-NeMo).

`LlavaBase` holds what LLaVA and LLaVA-NeXT (families/llava_next.py) share: the CLIP tower, the LLaMA/Mistral
language-model forward (position ids from an arange, RoPE tables of one row) and the step's tail, where the model
output keeps `image_hidden_states` until the Trainer drops it and accelerate's fp32 conversion copies it.

CUDA attention with a mask (Pixtral's block-diagonal mask between packed images): FlashAttention takes no mask, so
torch's SDPA picks cuDNN attention, first in the priority order on Hopper and accepting masks
(aten/src/ATen/native/transformers/cuda/sdp_utils.cpp `can_use_cudnn_attention`: `check_attn_mask_shape` only). It
takes the mask as an additive bias and its backward needs it (derivatives.yaml `_scaled_dot_product_cudnn_attention`
passes `attn_bias` to the backward), so each layer's node saves q, k, v, the output, the fp32 logsumexp and the
bias; under autocast a mask not in the autocast dtype is cast first (SDPA is on autocast's lower-precision list), a
copy per layer. profiler/emulate.py `_masked_sdpa` emulates the same kernel for the tracer.

Mirrors transformers 5.23 models/llava/modeling_llava.py (CLIP: models/clip/modeling_clip.py, Pixtral: models/pixtral/modeling_pixtral.py).
"""

from __future__ import annotations

from ...memory import ops, vision
from ...memory.blocks import Context, Params, apply_linear, gated_mlp
from ...memory.model import BaseModel, ConditionalGenerationStep, LMAttention
from ...memory.sim import Engine, Node, Param, T
from ...memory.vision import ClipLayer, LlavaProjector
from ...modules import VISION
from ...setup import TrainSetup

# Ops of the vision towers ---------------------------------------------------------------------------------------------


def masked_attention(setup: TrainSetup, mask: T, heads: int, length: int):
    """Attention over one packed sequence with an additive (1, 1, L, L) mask (Pixtral). sdpa: cuDNN attention with
    the mask as a saved bias (`ops.masked_fused_attention`); eager: Pixtral's eager_attention_forward, `matmul(q, k^T) * scaling
    + mask`, softmax in fp32, `.to(query.dtype)`, `matmul(., v)`, transpose(1, 2).contiguous(), where autocast casts
    the matmul operands and the mask's dtype promotes the masked scores."""

    def attention(e: Engine, q: T, k: T, v: T, name: str) -> T:
        if setup.attn == "eager":
            return eager_attention(e, q, k, v, heads, heads, length, 1, mask, name)
        if e.autocast:
            q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
        return ops.masked_fused_attention(e, q, k, v, mask, heads, length, name=name)

    return attention


def eager_attention(e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, length: int, batch: int, mask: T | None,
                    name: str) -> T:
    """transformers `eager_attention_forward` (llama, mistral, pixtral) with its dtypes as they come: repeat_kv copies
    K and V (locals until it returns), `matmul(q, k^T)` (autocast casts both operands), `* scaling`, `+ mask` (the
    mask's dtype promotes: fp32 scores when full fine-tuning makes the embeddings fp32), softmax in fp32,
    `.to(query.dtype)`, `matmul(., v)` (autocast casts again), transpose(1, 2).contiguous()."""
    query_dtype = q.dtype
    groups = heads // kv_heads
    if groups > 1:
        k = ops._copy(e, k, k.numel * groups, f"{name}.k_rep")
        v = ops._copy(e, v, v.numel * groups, f"{name}.v_rep")
    scores_numel = batch * heads * length * length
    qm, km = (ops.cast(e, t, e.autocast) for t in (q, k)) if e.autocast else (q, k)
    scores = e.new(scores_numel, e.autocast or ops.promote(qm.dtype, km.dtype), name=f"{name}.scores")
    e.record(Node("matmul", [t for t in (qm, km) if t.rg], [qm, km] if (qm.rg or km.rg) else [], []), scores)
    del qm, km
    scaled = ops.scale(e, scores, name=f"{name}.scaled")
    del scores
    if mask is not None:
        masked = ops.add(e, scaled, mask, name=f"{name}.masked")
        del scaled
        scaled = masked
    scores32 = ops.cast(e, scaled, "fp32", name=f"{name}.scores_fp32")  # softmax(dtype=float32) casts its input
    del scaled
    probs = e.new(scores_numel, "fp32", name=f"{name}.softmax")
    e.record(Node("softmax", [scores32] if scores32.rg else [], [probs], []), probs)
    del scores32
    weights = ops.cast(e, probs, query_dtype, name=f"{name}.probs")
    del probs
    wm, vm = (ops.cast(e, t, e.autocast) for t in (weights, v)) if e.autocast else (weights, v)
    del weights
    out = e.new(q.numel, e.autocast or ops.promote(wm.dtype, vm.dtype), name=f"{name}.pv")
    e.record(Node("matmul", [t for t in (wm, vm) if t.rg], [wm, vm] if (wm.rg or vm.rg) else [], []), out)
    del wm, vm
    contiguous = e.new(out.numel, out.dtype, name=name)
    e.record(Node("contiguous", [out] if out.rg else [], [], []), contiguous)
    return contiguous


class LlamaAttention(LMAttention):
    """The language model's attention: sdpa as `LMAttention`, eager as `eager_attention` (dtype-faithful)."""

    def __call__(self, e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, name: str) -> T:
        if self.setup.attn == "eager":
            return eager_attention(e, q, k, v, heads, kv_heads, self.seq, self.batch, self.mask, name)
        return super().__call__(e, q, k, v, heads, kv_heads, name)


class VisionContext(vision.VisionContext):
    """What a vision tower's layers share: token count, attention callable (CLIP: `batched_attention`; Pixtral:
    `masked_attention`), and Pixtral's RoPE tables and mask."""

    def __init__(self, tokens: int, attention) -> None:
        super().__init__(tokens, attention)
        self.cos = self.sin = self.mask = None


# Pixtral vision tower -----------------------------------------------------------------------------------------------


class PixtralLayer:
    """PixtralAttentionLayer (models/pixtral/modeling_pixtral.py): x + attention(attention_norm(x)), then
    h + feed_forward(ffn_norm(h)). PixtralAttention: q/k/v_proj (no bias), 2D RoPE on q and k
    (`apply_rotary_pos_emb`, tables in the hidden states' dtype), attention with the block mask, o_proj.
    PixtralMLP: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, p: Params, index: int) -> None:
        v = p.setup.model.vision
        self.v = v
        d, prefix = v.hidden_size, f"vision.transformer.layers.{index}"
        self.attention_norm = p.vector(VISION, f"{prefix}.attention_norm.weight", d)
        self.ffn_norm = p.vector(VISION, f"{prefix}.ffn_norm.weight", d)
        self.q = p.linear(VISION, f"{prefix}.attention.q_proj", d, d, False)
        self.k = p.linear(VISION, f"{prefix}.attention.k_proj", d, d, False)
        self.v_proj = p.linear(VISION, f"{prefix}.attention.v_proj", d, d, False)
        self.o = p.linear(VISION, f"{prefix}.attention.o_proj", d, d, False)
        self.gate = p.linear(VISION, f"{prefix}.feed_forward.gate_proj", d, v.intermediate_size, False)
        self.up = p.linear(VISION, f"{prefix}.feed_forward.up_proj", d, v.intermediate_size, False)
        self.down = p.linear(VISION, f"{prefix}.feed_forward.down_proj", v.intermediate_size, d, False)
        self.params = [self.attention_norm, self.ffn_norm] + [
            q for lp in (self.q, self.k, self.v_proj, self.o, self.gate, self.up, self.down)
            for q in lp.tensors]

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)

    def __call__(self, e: Engine, x: T, ctx: VisionContext) -> T:
        tokens = ctx.tokens
        residual = x
        h = ops.rms_norm(e, x, self.attention_norm, tokens, name="attention_norm")
        q = apply_linear(e, h, self.q, "q_proj")
        k = apply_linear(e, h, self.k, "k_proj")
        value = apply_linear(e, h, self.v_proj, "v_proj")
        q_rot = ops.rope(e, q, ctx.cos, ctx.sin, name="q_rope")
        k_rot = ops.rope(e, k, ctx.cos, ctx.sin, name="k_rope")
        del q, k
        attn = ctx.attention(e, q_rot, k_rot, value, "attention")
        del q_rot, k_rot, value
        o = apply_linear(e, attn, self.o, "o_proj")
        del attn, h  # the normed input is the attention's argument until it returns
        x = ops.add(e, residual, o, name="attn_residual")
        del residual, o
        residual = x
        h = ops.rms_norm(e, x, self.ffn_norm, tokens, name="ffn_norm")
        del x
        down = gated_mlp(e, h, self.gate, self.up, self.down)
        del h
        return ops.add(e, residual, down, name="mlp_residual")


# The shared LLaVA model -------------------------------------------------------------------------------------------


class LlavaBase(ConditionalGenerationStep, BaseModel):
    """What LlavaForConditionalGeneration and LlavaNextForConditionalGeneration share: the CLIP tower's parameters
    and forward, the language model as LlamaModel/MistralModel run it, and the output's image_hidden_states."""

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        self.vision_layer_count = (counts or {}).get("vision", setup.model.vision.num_layers)
        self.projector = None
        self._keep = None
        self.unused_params = []
        self._outputs = ()  # tensors the model output holds until the Trainer drops it (image_hidden_states)

    # CLIP ---------------------------------------------------------------------------------------------------------
    def _clip_params(self) -> None:
        """CLIPVisionModel: patch_embedding (conv, no bias), class_embedding, position_embedding (and its
        position_ids buffer), pre_layrnorm, the encoder layers, post_layernorm."""
        e, v = self.e, self.setup.model.vision
        full = self.p.full(VISION)
        dt = self.p._dtype(full)
        d = v.hidden_size
        self.patch = e.param("vision.patch_embedding", v.in_channels * v.patch_size ** 2 * d, dt, full, VISION,
                             shape=(d, v.in_channels, v.patch_size, v.patch_size))
        self.cls = e.param("vision.class_embedding", d, dt, full, VISION)
        self.positions = (v.image_size // v.patch_size) ** 2 + 1
        self.pos = e.param("vision.position_embedding", self.positions * d, dt, full, VISION,
                           shape=(self.positions, d))
        self.position_ids = e.param("vision.embeddings.position_ids", self.positions, "int64", False, VISION)
        self.pre_ln = (self.p.vector(VISION, "vision.pre_layrnorm.weight", d),
                       self.p.vector(VISION, "vision.pre_layrnorm.bias", d))
        self.post_ln = (self.p.vector(VISION, "vision.post_layernorm.weight", d),
                        self.p.vector(VISION, "vision.post_layernorm.bias", d))
        self.vision_layers = [ClipLayer(self.p, i) for i in range(self.vision_layer_count)]
        self.unused_params = self._clip_unused_params()

    def _clip(self, e: Engine, pixel_values: T, images: int) -> tuple[T, T]:
        """CLIPVisionModel.forward on `images` 336x336 views; returns (last_hidden_state, the hidden state that
        `vision_feature_layer` selects). The pooled output (post_layernorm of the CLS rows) is computed and dropped
        when get_image_features replaces `pooler_output`."""
        v = self.setup.model.vision
        d = v.hidden_size
        grid = self.positions - 1
        tokens = images * self.positions
        # CLIPVisionEmbeddings: patch_embedding(pixel_values.to(dtype=weight dtype)), flatten/transpose (views)
        pixels = ops.cast(e, pixel_values, self.patch.dtype, name="pixel_values:cast")
        patches = ops.patch_conv(e, pixels, self.patch, None, images * grid * d, "patch_embeds")
        patches = e.hook_input(patches)  # CLIPVisionModel.get_input_embeddings() is embeddings.patch_embedding
        del pixels
        # torch.cat([class_embedding.expand(n, 1, -1), patch_embeds], dim=1)
        cat = e.new(tokens * d, ops.promote(patches.dtype, self.cls.dtype), name="embeddings.cat")
        e.record(Node("cat", [patches] if patches.rg else [], [], [self.cls] if self.cls.trainable else []), cat)
        del patches
        # + position_embedding(position_ids): one (1, 577, d) lookup broadcast over the views
        pos = e.new(self.positions * d, self.pos.dtype, name="position_embedding")
        e.record(Node("embedding", [], [], [self.pos] if self.pos.trainable else []), pos)
        emb = ops.add(e, cat, pos, name="embeddings")
        del cat, pos
        hidden = ops.layer_norm(e, emb, self.pre_ln[0], self.pre_ln[1], tokens, name="pre_layrnorm")
        del emb
        ctx = VisionContext(tokens, vision.batched_attention(self.setup, self.positions))
        selected_index = self._clip_selected_index()
        selected = hidden if selected_index == 0 else None
        for index, layer in enumerate(self.vision_layers):
            hidden = self._run_layer(e, layer, hidden, ctx)
            if index + 1 == selected_index:
                selected = hidden  # captured by the output-capturing hooks
        del ctx
        # The layers after the selected one (and the pooling) feed no loss: their autograd graph lives as long as
        # the vision outputs do (until the model's forward returns) and dies with them (sim.py's weak tape).
        # pooled_output = post_layernorm(last_hidden_state[:, 0, :]), replaced by the image features afterwards
        self._pooled = self._post_layernorm(e, hidden, images, d)
        return hidden, selected

    def _clip_selected_index(self) -> int:
        """The index of the features in hidden_states = (embeddings, layer 1 output, ...): `vision_feature_layer`
        (-2 for LLaVA) counted from the end."""
        v, layers = self.setup.model.vision, len(self.vision_layers)
        return v.feature_layers[0] % (layers + 1) if v.feature_layers else layers

    def _clip_unused_params(self) -> list[Param]:
        """The CLIP layers after the selected hidden state and post_layernorm get no gradient (step._trainable)."""
        unused = [q for layer in self.vision_layers[self._clip_selected_index():] for q in layer.params]
        return unused + list(self.post_ln)

    def _post_layernorm(self, e: Engine, hidden: T, images: int, d: int) -> T:
        cls = hidden.view(images * d, name="last_hidden_state[:, 0]")
        return ops.layer_norm(e, cls, self.post_ln[0], self.post_ln[1], images, name="post_layernorm")

    # Image features into the sequence ------------------------------------------------------------------------------
    def _scatter(self, e: Engine, x: T, pooler_output: list[T], narrow: bool = False) -> T:
        """forward: torch.cat(pooler_output).to(inputs_embeds.dtype); special_image_mask = input_ids == image_token_id
        (a local alive until the model returns); inputs_embeds.masked_scatter(mask, image_features) saves the
        mask. The cat is the output's image_hidden_states. Its backward hands each part a narrowed view of the
        gradient (`narrow`); LLaVA passes the projector output whole, whose per-image views `list()` made
        (UnbindBackward stacks their gradients into one new tensor)."""
        dtype = pooler_output[0].dtype
        cat = e.new(sum(t.numel for t in pooler_output), dtype, name="image_features.cat")
        inputs = [t for t in pooler_output if t.rg]
        node = Node("cat", inputs, [], [])
        if narrow:
            node.grad_dtype = {index: "passthrough" for index in range(len(inputs))}
        e.record(node, cat)
        del inputs, pooler_output
        cast = ops.cast(e, cat, x.dtype, name="image_features:cast")
        del cat
        e.scope = "language"
        mask = e.new(self.tokens, "bool", name="image_mask")
        out = ops.masked_scatter(e, x, mask, cast, name="inputs_embeds:scatter")
        self._outputs = (cast,)
        self._mask = mask
        return out

    # Language model -------------------------------------------------------------------------------------------------
    def language(self, e: Engine, x: T) -> T:
        """LlamaModel.forward / MistralModel.forward: position_ids = arange(seq).unsqueeze(0) (alive until it returns,
        and kept by every checkpointed layer's keyword arguments), the causal mask (eager only), RoPE tables of one
        row (batch 1 position ids), the decoder layers and the final norm."""
        t = self.setup.model.text
        ctx = Context(tokens=self.tokens, attention=LlamaAttention(self.setup, self.batch, self.seq))
        ctx.position_ids = e.new(self.seq, "int64", name="position_ids")
        if self.setup.attn == "eager":
            ctx.attention.mask = e.new(self.batch * self.seq * self.seq, x.dtype, name="causal_mask")
        ctx.cos = e.new(self.seq * t.head_dim, x.dtype, name="cos")
        ctx.sin = e.new(self.seq * t.head_dim, x.dtype, name="sin")
        for layer in self.layers:
            x = self._run_layer(e, layer, x, ctx)
        out = ops.rms_norm(e, x, self.norm, self.tokens, name="norm")
        del x, ctx  # the mask, RoPE tables and position ids are locals of the forward until it returns
        # LlavaModel.forward returns: the vision outputs, the pooler features and the placeholder mask die
        self._keep = self._mask = None
        return out


class LlavaModel(LlavaBase):
    """LlavaForConditionalGeneration: CLIP (vision_feature_layer -2, strategy "default": CLS dropped) or Pixtral
    (vision_feature_layer -1, strategy "full", all images packed into one sequence) tower, projector, LM."""

    @classmethod
    def text_layer_delta_shared(cls, spec) -> bool:
        """Not with a Pixtral tower: where the loss segment peaks depends on the image size there, so one more
        language-model layer does not add the same to it at every size (tests/test_speed_shortcuts.py shows it)."""
        return spec.vision.arch != "pixtral"

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        self.pixtral = setup.model.vision.arch == "pixtral"
        if self.pixtral:
            self._pixtral_params()
        else:
            self._clip_params()
        self.projector = LlavaProjector(self.p)
        self.images = setup.image_tokens() if setup.images else []
        self.n_images = len(self.images) * self.batch

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        if self.n_images and self.pixtral:
            height = max(t.resized_height for t in self.images)
            width = max(t.resized_width for t in self.images)
            inputs["pixel_values"] = e.new(self.n_images * v.in_channels * height * width, "fp32",
                                           name="pixel_values", category="inputs/batch")
            inputs["image_sizes"] = e.new(self.n_images * 2, "int64", name="image_sizes", category="inputs/batch")
        elif self.n_images:
            inputs["pixel_values"] = e.new(self.n_images * v.in_channels * v.image_size ** 2, "fp32",
                                           name="pixel_values", category="inputs/batch")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        x = self.embed_tokens(e)
        if not self.n_images:
            return x
        e.scope = "vision"
        if self.pixtral:
            hidden, selected = self._pixtral(e, inputs["pixel_values"])
            features = selected
        else:
            hidden, selected = self._clip(e, inputs["pixel_values"], self.n_images)
            grid = self.positions - 1
            # selected[:, 1:] ("default" strategy): a view
            features = selected.view(self.n_images * grid * self.setup.model.vision.hidden_size,
                                     name="selected[:, 1:]")
        e.scope = "projector"
        image_features = self.projector(e, features)
        del features
        self._pooled = None  # `image_outputs.pooler_output = image_features`: the CLS pooling dies
        # pooler_output = the per-image splits (views) of the projector output; the vision outputs stay referenced
        # by mm_encoder_outputs until LlavaModel.forward returns
        self._keep = (hidden, selected, image_features)
        del hidden, selected
        return self._scatter(e, x, [image_features])

    # Pixtral --------------------------------------------------------------------------------------------------------
    def _pixtral_params(self) -> None:
        """PixtralVisionModel: patch_conv (no bias), ln_pre (RMSNorm), the transformer layers, and the 2D RoPE's
        inv_freq / original_inv_freq buffers (head_dim / 2 fp32 each)."""
        e, v = self.e, self.setup.model.vision
        full = self.p.full(VISION)
        d = v.hidden_size
        self.patch = e.param("vision.patch_conv", v.in_channels * v.patch_size ** 2 * d, self.p._dtype(full), full,
                             VISION, shape=(d, v.in_channels, v.patch_size, v.patch_size))
        self.ln_pre = self.p.vector(VISION, "vision.ln_pre.weight", d)
        self.vision_layers = [PixtralLayer(self.p, i) for i in range(self.vision_layer_count)]
        self.vision_buffers = [e.param(f"vision.patch_positional_embedding.{n}", v.head_dim // 2, "fp32", False,
                                       VISION) for n in ("inv_freq", "original_inv_freq")]

    def _pixtral(self, e: Engine, pixel_values: T) -> tuple[T, T]:
        """PixtralVisionModel.forward: patch_conv on the padded batch, each image's patches cropped (views), flattened
        and concatenated into one sequence, ln_pre, 2D RoPE tables (no grad, in the hidden states' dtype), the dense
        block-diagonal mask `generate_block_attention_mask` (sdpa and eager), the layers. The conv output stays
        referenced by `patch_embeds_list` until the forward returns."""
        v = self.setup.model.vision
        d = v.hidden_size
        height = max(t.resized_height for t in self.images) // v.patch_size
        width = max(t.resized_width for t in self.images) // v.patch_size
        tokens = sum(t.vision_patches for t in self.images) * self.batch
        pixels = ops.cast(e, pixel_values, self.patch.dtype, name="pixel_values:cast")
        conv = ops.patch_conv(e, pixels, self.patch, None, self.n_images * height * width * d, "patch_conv")
        conv = e.hook_input(conv)  # PixtralVisionModel.get_input_embeddings() is patch_conv
        del pixels
        # p.flatten(1).T per image: a copy for a cropped (padded-batch) image, a view for a full one
        pieces = [e.new(t.vision_patches * d, conv.dtype, name="patch.flatten")
                  for t in self.images * self.batch if (t.resized_height // v.patch_size,
                                                         t.resized_width // v.patch_size) != (height, width)]
        for piece in pieces:
            e.record(Node("reshape_copy", [conv] if conv.rg else [], [], []), piece)
        cat = e.new(tokens * d, conv.dtype, name="patch_embeds.cat")
        e.record(Node("cat", [conv] if conv.rg else [], [], []), cat)
        del pieces
        hidden = ops.rms_norm(e, cat, self.ln_pre, tokens, name="ln_pre")
        del cat
        position_ids = e.new(tokens * 2, "int64", name="vision.position_ids")
        # PixtralVisionRotaryEmbedding under no_grad: cos/sin (tokens, head_dim) in the hidden states' dtype
        ctx = VisionContext(tokens, None)
        ctx.cos = e.new(tokens * v.head_dim, hidden.dtype, name="vision.cos")
        ctx.sin = e.new(tokens * v.head_dim, hidden.dtype, name="vision.sin")
        ctx.mask = e.new(tokens * tokens, hidden.dtype, name="block_attention_mask")
        ctx.attention = masked_attention(self.setup, ctx.mask, v.num_heads, tokens)
        for layer in self.vision_layers:
            hidden = self._run_layer(e, layer, hidden, ctx)
        del ctx, position_ids, conv
        return hidden, hidden  # vision_feature_layer -1: hidden_states[-1] is the last hidden state


MODELS = {"llava": LlavaModel}
