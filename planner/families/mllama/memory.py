"""Llama 3.2 Vision (transformers models/mllama/modeling_mllama.py): a tiled ViT, one Linear projector and a Llama
language model whose cross-attention layers read the image features.

Vision (MllamaVisionModel.forward): every image slot runs all `max_num_tiles` tile slots (padding tiles are masked,
not skipped). Per tile: patch Conv2d (no bias), a class token, gated tile/position embeddings, pre-LayerNorm, padding
of the 1601 positions to 1608; then 32 local layers over the 4 x 1608 = 6432 positions of an image with an additive
aspect-ratio mask (a (slots, 6432, 6432) matrix product of the tile mask), post-LayerNorm, the post-tile embedding and
8 gated global layers with the same mask. Under autocast the LayerNorms return fp32, so the residual stream is fp32.
The encoder keeps every local layer's output (`encoder_states`) until the forward returns, and the output is the last
global state concatenated with a stack of five local ones (1280 * 6 = 7680 features per position). The vision layers
are plain nn.Modules: gradient checkpointing never wraps them.

SDPA with a mask has no FlashAttention kernel; on Hopper cuDNN attention takes the mask as an additive bias that its
backward keeps with q, k and v (profiler/emulate.py `_masked_sdpa`). K and V of grouped-query attention are
expanded by `repeat_kv` first when a mask is given (transformers `use_gqa_in_sdpa`).

Language model (MllamaTextModel): LLaMA self-attention layers and, at `cross_attention_layers`, cross-attention layers:
q_proj + q_norm on the text, k_proj/v_proj + k_norm on the projected image features (4 x 1601 per image), SDPA with
the (batch, 1, seq, images * 4 * 1601) cross-attention mask, tanh-gated residuals, and the MLP output zeroed on rows
that see no image (`full_text_row_masked_out_mask`). Checkpointed layers keep the image features, the masks and the
RoPE tables in their saved arguments until backward ends.

Mirrors transformers 5.23 models/mllama/modeling_mllama.py.
"""

from __future__ import annotations

from dataclasses import replace

from ...errors import VlplanError
from ...memory import ops
from ...memory.blocks import Context, LlamaLayer, Params, apply_linear, gated_mlp
from ...memory.model import BaseModel, ConditionalGenerationStep, LMAttention
from ...memory.sim import Engine, Node, T
from ...memory.stacks import checkpoint_reentrant, input_embeddings_hooked
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...setup import Train, TrainSetup
from ...spec import ModelSpec
from . import tokens as tile_rule

# Layer counts -------------------------------------------------------------------------------------------------------


def layer_counts(spec: ModelSpec) -> dict[str, int]:
    """Self-attention and cross-attention decoder layers, local and global (gated) vision layers."""
    cross = len(spec.text.cross_attention_layers)
    return {"text": spec.text.num_layers - cross, "cross": cross, "vision": spec.vision.num_layers,
            "vision_global": spec.vision.num_global_layers}


def cross_positions(self_layers: int, cross_layers: int) -> tuple[int, ...]:
    """Where the cross-attention layers sit among self + cross layers: after every run of self-attention layers,
    as in the checkpoint (3, 8, ..., 38: one after each four self-attention layers)."""
    run = self_layers // cross_layers if cross_layers else 0
    return tuple(k * (run + 1) + run for k in range(cross_layers))


def spec_with_layers(spec: ModelSpec, counts: dict[str, int]) -> ModelSpec:
    """A spec with the given layer counts. The projector still reads five intermediate local-layer outputs (its
    input width depends on it): indexes beyond the local layers are clamped to the last one."""
    self_layers, cross = counts["text"], counts["cross"]
    text = replace(spec.text, num_layers=self_layers + cross,
                   cross_attention_layers=cross_positions(self_layers, cross))
    local = counts["vision"]
    vision = replace(spec.vision, num_layers=local, num_global_layers=counts["vision_global"],
                     intermediate_layers_indices=tuple(min(i, local - 1)
                                                       for i in spec.vision.intermediate_layers_indices))
    return replace(spec, text=text, vision=vision)


def check_setup(setup: TrainSetup) -> None:
    """Reentrant gradient checkpointing (LLaMA-Factory's default) cannot back-propagate into the image features:
    a checkpointed cross-attention layer gets them as a keyword argument, not as a checkpoint input, so its
    recomputed backward runs on into the projector and vision graph, and the second cross-attention layer's
    backward finds that graph freed ("Trying to backward through the graph a second time"; checked on a real tiny
    model with two cross-attention layers). The features need a gradient when the tower or projector trains, and
    under LLaMA-Factory's LoRA / OFT, whose `enable_input_require_grads` hooks the vision tower's patch embedding
    too (traced with LLaMA-Factory 0.9.5's own preparation and transformers 5.23: tests/test_accuracy_mllama_*)."""
    if not setup.gradient_checkpointing:
        return
    if setup.vision is not Train.FROZEN or setup.projector is not Train.FROZEN:
        raise VlplanError(
            "Llama 3.2 Vision cannot train the vision tower or projector with gradient checkpointing (reentrant, "
            "LLaMA-Factory's default): every cross-attention layer back-propagates into the same image features and "
            "PyTorch fails on the second; turn gradient checkpointing off or keep them frozen")
    if checkpoint_reentrant(setup) and input_embeddings_hooked(setup):
        raise VlplanError(
            f"Llama 3.2 Vision {setup.method} on LLaMA-Factory's stack fails at the first backward with gradient "
            "checkpointing: its enable_input_require_grads makes the image features require grad, and under its "
            "reentrant checkpointing every cross-attention layer back-propagates into them, so PyTorch fails on the "
            "second (LLaMA-Factory 0.9.5, transformers 5.23); turn gradient checkpointing off (LLaMA-Factory's "
            "use_reentrant_gc: false would avoid it, but vlplan does not model that)")


# Shared pieces ------------------------------------------------------------------------------------------------------


def gate_tanh(e: Engine, gate) -> T:
    """`gate.tanh()` of a one-element gate parameter; TanhBackward keeps the result when the gate trains."""
    out = e.new(1, gate.dtype, name=f"{gate.name}.tanh")
    e.record(Node("tanh", [], [out] if gate.trainable else [], [gate] if gate.trainable else []), out)
    return out


def gated(e: Engine, gate, x: T, name: str) -> T:
    """`gate.tanh() * x` for a one-element gate parameter: the tanh (shape (1,), not a 0-d scalar, so it takes part
    in type promotion) is a temporary of the expression."""
    value = gate_tanh(e, gate)
    return ops.mul(e, value, x, name=name)


# Vision tower -------------------------------------------------------------------------------------------------------


class MllamaVisionLayer:
    """MllamaVisionEncoderLayer: input_layernorm -> self_attn (q/k/v/o_proj without bias, masked SDPA) -> [tanh
    gate] -> residual -> post_attention_layernorm -> mlp (fc1, GELU, fc2) -> [tanh gate] -> residual."""

    def __init__(self, p: Params, index: int, gated_layer: bool) -> None:
        v = p.setup.model.vision
        self.v, self.is_gated = v, gated_layer
        d = v.hidden_size
        prefix = f"vision.{'global_' if gated_layer else ''}layers.{index}"
        self.ln1 = (p.vector(VISION, f"{prefix}.input_layernorm.weight", d),
                    p.vector(VISION, f"{prefix}.input_layernorm.bias", d))
        self.ln2 = (p.vector(VISION, f"{prefix}.post_attention_layernorm.weight", d),
                    p.vector(VISION, f"{prefix}.post_attention_layernorm.bias", d))
        self.q = p.linear(VISION, f"{prefix}.q_proj", d, d, False)
        self.k = p.linear(VISION, f"{prefix}.k_proj", d, d, False)
        self.v_proj = p.linear(VISION, f"{prefix}.v_proj", d, d, False)
        self.o = p.linear(VISION, f"{prefix}.o_proj", d, d, False)
        self.fc1 = p.linear(VISION, f"{prefix}.fc1", d, v.intermediate_size, True)
        self.fc2 = p.linear(VISION, f"{prefix}.fc2", v.intermediate_size, d, True)
        self.gates = ((p.vector(VISION, f"{prefix}.gate_attn", 1), p.vector(VISION, f"{prefix}.gate_ffn", 1))
                      if gated_layer else ())

    def __call__(self, e: Engine, x: T, ctx: "VisionContext") -> T:
        v, tokens = self.v, ctx.tokens
        residual = x
        h = ops.layer_norm(e, x, self.ln1[0], self.ln1[1], tokens, name="input_layernorm")
        q = apply_linear(e, h, self.q, "q_proj")
        k = apply_linear(e, h, self.k, "k_proj")
        value = apply_linear(e, h, self.v_proj, "v_proj")
        if e.autocast:
            q, k, value = (ops.cast(e, t, e.autocast) for t in (q, k, value))
        if ctx.eager:
            attn = ops.eager_attention(e, q, k, value, v.num_heads, v.num_heads, ctx.length, ctx.length, ctx.slots,
                                       ctx.mask, name="self_attn")
        else:
            attn = ops.masked_fused_attention(e, q, k, value, ctx.mask, v.num_heads, tokens, name="self_attn")
        o = apply_linear(e, attn, self.o, "o_proj")
        del q, k, value, attn, h  # MllamaVisionAttention.forward returns
        if self.is_gated:
            o = gated(e, self.gates[0], o, "gate_attn*attn")
        x = ops.add(e, residual, o, name="attn_residual")
        del residual, o
        residual = x
        h = ops.layer_norm(e, x, self.ln2[0], self.ln2[1], tokens, name="post_attention_layernorm")
        del x
        f = apply_linear(e, h, self.fc1, "fc1")
        a = ops.unary(e, "gelu", f, name="act")
        del f
        m = apply_linear(e, a, self.fc2, "fc2")
        del a, h
        if self.is_gated:
            m = gated(e, self.gates[1], m, "gate_ffn*mlp")
        return ops.add(e, residual, m, name="mlp_residual")


class VisionContext:
    def __init__(self, slots: int, length: int, mask: T, eager: bool) -> None:
        self.slots, self.length, self.tokens, self.mask, self.eager = slots, length, slots * length, mask, eager


class MllamaVision:
    """MllamaVisionModel: parameters and forward (see the module docstring)."""

    def __init__(self, model: BaseModel, local_layers: int, global_layers: int) -> None:
        p, e = model.p, model.e
        v = p.setup.model.vision
        self.v = v
        full = p.full(VISION)
        dt = p._dtype(full)
        d = v.hidden_size
        self.positions = (v.image_size // v.patch_size) ** 2 + 1  # 1601 with the class token
        rows = v.num_aspect_ratios + 1  # nn.Embedding(max_aspect_ratio_id + 1, ...)
        self.patch = e.param("vision.patch_embedding.weight", v.in_channels * v.patch_size ** 2 * d, dt, full, VISION,
                             shape=(d, v.in_channels, v.patch_size, v.patch_size))
        self.class_embedding = e.param("vision.class_embedding", d, dt, full, VISION)
        self.pos_gate = e.param("vision.gated_positional_embedding.gate", 1, dt, full, VISION)
        self.pos_embedding = e.param("vision.gated_positional_embedding.embedding", self.positions * d, dt, full,
                                     VISION, shape=(self.positions, d))
        self.tile_embedding = e.param("vision.gated_positional_embedding.tile_embedding",
                                      rows * v.max_num_tiles * self.positions * d, dt, full, VISION,
                                      shape=(rows, v.max_num_tiles * self.positions * d))
        self.pre_tile = (e.param("vision.pre_tile_positional_embedding.embedding", rows * v.max_num_tiles * d, dt,
                                 full, VISION, shape=(rows, v.max_num_tiles * d)),
                         e.param("vision.pre_tile_positional_embedding.gate", 1, dt, full, VISION))
        self.post_tile = (e.param("vision.post_tile_positional_embedding.embedding", rows * v.max_num_tiles * d, dt,
                                  full, VISION, shape=(rows, v.max_num_tiles * d)),
                          e.param("vision.post_tile_positional_embedding.gate", 1, dt, full, VISION))
        self.ln_pre = (p.vector(VISION, "vision.layernorm_pre.weight", d), p.vector(VISION, "vision.layernorm_pre.bias", d))
        self.ln_post = (p.vector(VISION, "vision.layernorm_post.weight", d),
                        p.vector(VISION, "vision.layernorm_post.bias", d))
        self.local = [MllamaVisionLayer(p, i, False) for i in range(local_layers)]
        # as spec_with_layers clamps them for fewer local layers
        self.indices = tuple(min(i, local_layers - 1) for i in v.intermediate_layers_indices)
        self.glob = [MllamaVisionLayer(p, i, True) for i in range(global_layers)]

    @property
    def dtype(self) -> str:
        """`self.dtype` of MllamaVisionModel (and MllamaModel): its first floating parameter, class_embedding."""
        return self.class_embedding.dtype

    def _tile_embedding(self, e: Engine, x: T, table, gate, slots: int, name: str) -> T:
        """MllamaPrecomputedAspectRatioEmbedding: embedding(aspect_ratio_ids) * gate.tanh(), added to every patch of
        its tile."""
        v = self.v
        emb = e.new(slots * v.max_num_tiles * v.hidden_size, table.dtype, name=f"{name}.embedding")
        e.record(Node("embedding", [], [], [table] if table.trainable else []), emb)
        scaled = gated(e, gate, emb, f"{name}.gated")
        del emb
        out = ops.add(e, x, scaled, name=name)
        del scaled
        return out

    def __call__(self, e: Engine, pixel_values: T, slots: int, setup: TrainSetup) -> T:
        v = self.v
        d, tiles = v.hidden_size, v.max_num_tiles
        grid = (v.image_size // v.patch_size) ** 2
        padded = tile_rule.tile_positions(setup.model.processor)
        length = tiles * padded
        # patch_embedding(pixel_values.to(weight dtype)); `patch_embeds` is a local until forward returns
        pixels = ops.cast(e, pixel_values, self.patch.dtype, name="pixel_values:cast")
        patch_embeds = ops.conv2d(e, pixels, self.patch, None, slots * tiles * grid * d, name="patch_embeds")
        patch_embeds = e.hook_input(patch_embeds)  # MllamaVisionModel.get_input_embeddings() is patch_embedding
        del pixels
        # flatten(2).transpose(1, 2) then reshape to (slots, tiles, patches, d): a copy of the transposed view
        x = ops._copy(e, patch_embeds, patch_embeds.numel, "patch_embeds.reshape")
        x = self._tile_embedding(e, x, *self.pre_tile, slots, "pre_tile_positional_embedding")
        # apply_class_embedding: cat([class_embedding.expand(...), hidden_states], dim=1)
        cat = e.new(slots * tiles * self.positions * d, ops.promote(self.class_embedding.dtype, x.dtype),
                    name="class_embedding.cat")
        e.record(Node("cat", [x] if x.rg else [], [], [self.class_embedding] if self.class_embedding.trainable
                      else []), cat)
        del x
        x = self._gated_positional_embedding(e, cat, slots)
        del cat
        h = ops.layer_norm(e, x, self.ln_pre[0], self.ln_pre[1], slots * tiles * self.positions, name="layernorm_pre")
        del x
        x = ops._copy(e, h, slots * tiles * padded * d, "pad")  # F.pad to a multiple of 8 positions
        del h
        mask = self._aspect_ratio_mask(e, slots, length)
        ctx = VisionContext(slots, length, mask, setup.attn == "eager")
        encoder_states = []
        for layer in self.local:
            x = layer(e, x, ctx)
            encoder_states.append(x)  # MllamaVisionEncoder keeps every layer's output
        h = ops.layer_norm(e, x, self.ln_post[0], self.ln_post[1], slots * length, name="layernorm_post")
        del x
        x = self._tile_embedding(e, h, *self.post_tile, slots, "post_tile_positional_embedding")
        del h
        global_states = []
        for layer in self.glob:
            x = layer(e, x, ctx)
            global_states.append(x)
        # the last global state and five local ones (views without the 7 padding positions): stack, then cat
        chosen = [encoder_states[i] for i in self.indices]
        stacked = e.new(slots * length * d * len(chosen), chosen[0].dtype, name="intermediate.stack")
        e.record(Node("stack", [t for t in chosen if t.rg], [], []), stacked)
        del chosen
        out = e.new(slots * tiles * self.positions * d * (1 + len(self.indices)),
                    ops.promote(x.dtype, stacked.dtype), name="vision_output.cat")
        e.record(Node("cat", [t for t in (x, stacked) if t.rg], [], []), out)
        del x, stacked, encoder_states, global_states, ctx, mask, patch_embeds  # MllamaVisionModel.forward returns
        return out

    def _gated_positional_embedding(self, e: Engine, x: T, slots: int) -> T:
        """MllamaPrecomputedPositionEmbedding: + (1 - gate.tanh()) * embedding, + gate.tanh() *
        tile_embedding(aspect_ratio_ids) (one (tiles, 1601, d) row per image slot)."""
        v = self.v
        g = gate_tanh(e, self.pos_gate)
        one_minus = e.new(1, g.dtype, name="1-gate.tanh")
        e.record(Node("rsub", [g] if g.rg else [], [], []), one_minus)
        del g
        # (1 - gate.tanh()) * self.embedding: MulBackward keeps the embedding for the gate's gradient, the scalar for
        # the embedding's
        pos = e.new(self.pos_embedding.numel, ops.promote(one_minus.dtype, self.pos_embedding.dtype),
                    name="gated_position_embedding")
        e.record(Node("mul", [one_minus] if one_minus.rg else [],
                      [one_minus] if self.pos_embedding.trainable else [],
                      [self.pos_embedding] if self.pos_embedding.trainable else []), pos)
        del one_minus
        x = ops.add(e, x, pos, name="positions")
        del pos
        tile = e.new(slots * v.max_num_tiles * self.positions * v.hidden_size, self.tile_embedding.dtype,
                     name="tile_position_embedding")
        e.record(Node("embedding", [], [], [self.tile_embedding] if self.tile_embedding.trainable else []), tile)
        gated_tile = gated(e, self.pos_gate, tile, "gated_tile_position_embedding")
        out = ops.add(e, x, gated_tile, name="tile_positions")
        del x, tile, gated_tile  # the module's forward returns
        return out

    def _aspect_ratio_mask(self, e: Engine, slots: int, length: int) -> T:
        """_prepare_aspect_ratio_attention_mask: the tile mask as (slots, 4 * 1608, 1) in the model dtype, then
        `mask @ mask.transpose(-1, -2) * finfo(dtype).min` (autocast runs the matmul in the half dtype)."""
        dtype = self.dtype
        tiles = self.v.max_num_tiles
        small = e.new(slots * tiles, dtype, name="aspect_ratio_mask.to")
        repeated = e.new(slots * length, dtype, name="aspect_ratio_mask.repeat")
        del small
        inverted = e.new(slots * length, dtype, name="1-aspect_ratio_mask")
        del repeated
        operands = [ops.cast(e, inverted, e.autocast, name="mask_operand") for _ in range(2)] if e.autocast else []
        product = e.new(slots * length * length, e.autocast or dtype, name="mask@mask.T")
        del operands
        mask = e.new(product.numel, product.dtype, name="aspect_ratio_attention_mask")  # * finfo(dtype).min
        del product, inverted
        return mask


# Cross-attention decoder layer --------------------------------------------------------------------------------------


class MllamaCrossLayer:
    """MllamaCrossAttentionDecoderLayer (see the module docstring)."""

    def __init__(self, p: Params, index: int, trainable: bool = True) -> None:
        t = p.setup.model.text
        self.t = t
        prefix = f"language.layers.{index}"
        h, q_out, kv_out = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        self.norm1 = p.vector(LANGUAGE, f"{prefix}.input_layernorm", h, trainable)
        self.norm2 = p.vector(LANGUAGE, f"{prefix}.post_attention_layernorm", h, trainable)
        self.q_norm = p.vector(LANGUAGE, f"{prefix}.q_norm", t.head_dim, trainable)
        self.k_norm = p.vector(LANGUAGE, f"{prefix}.k_norm", t.head_dim, trainable)
        self.attn_gate = p.vector(LANGUAGE, f"{prefix}.cross_attn_attn_gate", 1, trainable)
        self.mlp_gate = p.vector(LANGUAGE, f"{prefix}.cross_attn_mlp_gate", 1, trainable)
        self.q = p.linear(LANGUAGE, f"{prefix}.q_proj", h, q_out, False, trainable)
        self.k = p.linear(LANGUAGE, f"{prefix}.k_proj", h, kv_out, False, trainable)
        self.v = p.linear(LANGUAGE, f"{prefix}.v_proj", h, kv_out, False, trainable)
        self.o = p.linear(LANGUAGE, f"{prefix}.o_proj", q_out, h, False, trainable)
        self.gate = p.linear(LANGUAGE, f"{prefix}.gate_proj", h, t.intermediate_size, False, trainable)
        self.up = p.linear(LANGUAGE, f"{prefix}.up_proj", h, t.intermediate_size, False, trainable)
        self.down = p.linear(LANGUAGE, f"{prefix}.down_proj", t.intermediate_size, h, False, trainable)
        self.params = [self.norm1, self.norm2, self.q_norm, self.k_norm, self.attn_gate, self.mlp_gate] + [
            q for lp in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
            for q in lp.tensors]

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)

    def __call__(self, e: Engine, x: T, ctx: Context) -> T:
        t, tokens = self.t, ctx.tokens
        heads, kv_heads = t.num_heads, t.num_kv_heads
        residual = x
        h = ops.rms_norm(e, x, self.norm1, tokens, name="input_layernorm")
        # MllamaTextCrossAttention.forward
        q = apply_linear(e, h, self.q, "q_proj")
        q_normed = _head_norm(e, q, self.q_norm, tokens * heads, "q_norm")
        del q
        k = apply_linear(e, ctx.cross, self.k, "k_proj")
        value = apply_linear(e, ctx.cross, self.v, "v_proj")
        kv_rows = ctx.cross.numel // t.hidden_size
        k_normed = _head_norm(e, k, self.k_norm, kv_rows * kv_heads, "k_norm")
        del k
        attn = self._attention(e, q_normed, k_normed, value, ctx, kv_rows)
        o = apply_linear(e, attn, self.o, "o_proj")
        del q_normed, k_normed, value, attn, h
        scaled = gated(e, self.attn_gate, o, "attn_gate*attn")
        del o
        x = ops.add(e, residual, scaled, name="attn_residual")
        del residual, scaled
        residual = x
        h = ops.rms_norm(e, x, self.norm2, tokens, name="post_attention_layernorm")
        del x
        m = gated_mlp(e, h, self.gate, self.up, self.down)
        del h
        masked = ops.mul(e, ctx.row_mask, m, name="full_text_row_masked_out_mask*mlp")
        del m
        scaled = gated(e, self.mlp_gate, masked, "mlp_gate*mlp")
        del masked
        out = ops.add(e, residual, scaled, name="mlp_residual")
        return out

    def _attention(self, e: Engine, q: T, k: T, v: T, ctx: Context, kv_rows: int) -> T:
        """sdpa_attention_forward with the cross-attention mask: repeat_kv (a mask disables enable_gqa), then the
        masked cuDNN kernel; eager: eager_attention_forward with the additive mask."""
        t = self.t
        groups = t.num_heads // t.num_kv_heads
        batch = ctx.tokens // ctx.seq
        if ctx.eager:
            return ops.eager_attention(e, q, k, v, t.num_heads, t.num_kv_heads, ctx.seq, kv_rows // batch, batch,
                                       ctx.cross_mask, name="cross_attn")
        key = ops._copy(e, k, k.numel * groups, "cross_attn.k_rep") if groups > 1 else k
        value = ops._copy(e, v, v.numel * groups, "cross_attn.v_rep") if groups > 1 else v
        if e.autocast:
            q, key, value = (ops.cast(e, x, e.autocast) for x in (q, key, value))
        out = ops.masked_fused_attention(e, q, key, value, ctx.cross_mask, t.num_heads, ctx.tokens, name="cross_attn")
        del key, value
        return out


# The model ----------------------------------------------------------------------------------------------------------


class MllamaModel(ConditionalGenerationStep, BaseModel):
    """MllamaForConditionalGeneration."""

    # MllamaModel registers vision_model, language_model, multi_modal_projector (lm_head last, as everywhere)
    param_order = (VISION, LANGUAGE, PROJECTOR)
    # One more frozen vision layer adds more than its weights: the tower keeps the outputs of chosen local layers
    # (`intermediate_layers_indices`) for the projector, and their positions move with the layer counts
    # (`spec_with_layers`); tests/test_speed_shortcuts.py shows the shortcut would be wrong here
    frozen_vision_layers_add_weights_only = False
    check_setup = staticmethod(check_setup)

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        spec = setup.model
        counts = counts or layer_counts(spec)
        super().__init__(e, setup, {"text": 0})  # embedding, final norm, lm_head, RoPE buffers; layers below
        self.vision = MllamaVision(self, counts["vision"], counts["vision_global"])
        proj = spec.projector
        self.projector = self.p.linear(PROJECTOR, "multi_modal_projector", proj.in_features, proj.out_features,
                                       proj.bias)
        total = counts["text"] + counts["cross"]
        cross = set(cross_positions(counts["text"], counts["cross"]))
        first_trainable = total - setup.freeze_trainable_layers if setup.method == "freeze" else 0
        self.layers = [(MllamaCrossLayer if i in cross else LlamaLayer)(self.p, i, trainable=i >= first_trainable)
                       for i in range(total)]
        self.n_images = len(setup.images)
        self.slots = self.n_images * self.batch

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        if self.n_images:
            tiles = v.max_num_tiles
            inputs["pixel_values"] = e.new(self.slots * tiles * v.in_channels * v.image_size ** 2, "fp32",
                                           name="pixel_values", category="inputs/batch")
            inputs["aspect_ratio_ids"] = e.new(self.slots, "int64", name="aspect_ratio_ids", category="inputs/batch")
            inputs["aspect_ratio_mask"] = e.new(self.slots * tiles, "int64", name="aspect_ratio_mask",
                                                category="inputs/batch")
            inputs["cross_attention_mask"] = e.new(self.tokens * self.n_images * tiles, "int64",
                                                   name="cross_attention_mask", category="inputs/batch")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        """MllamaModel.forward up to the language model: the vision tower, the projector (its output, reshaped to
        (slots * tiles, 1601, hidden), is the cross-attention states), and _prepare_cross_attention_mask."""
        self._keep = ()
        self.cross = self.cross_mask = self.row_mask = None
        if self.n_images:
            v = self.setup.model.vision
            e.scope = "vision"
            features = self.vision(e, inputs["pixel_values"], self.slots, self.setup)
            e.scope = "projector"
            self.cross = apply_linear(e, features, self.projector, "multi_modal_projector")
            e.scope = "language"
            self.cross_mask, self.row_mask = self._cross_attention_mask(e, v)
            self._keep = (features,)  # `vision_outputs` lives until MllamaModel.forward returns
            del features
        e.scope = "language"
        return self.embed_tokens(e)

    def _cross_attention_mask(self, e: Engine, v) -> tuple[T, T]:
        """_prepare_cross_attention_mask(mask, num_vision_tokens=1601, dtype=self.dtype): repeat_interleave over the
        tile positions (int64), (1.0 - mask) in fp32 then .to(dtype), masked_fill(inverted.to(bool), min), the
        per-row `any` (full_text_row_masked_out_mask, (batch, 1, seq, 1)), then `mask *= row_mask` in place."""
        dtype = self.vision.dtype
        keys = self.n_images * v.max_num_tiles * self.vision.positions
        numel = self.tokens * keys
        index = e.new(v.max_num_tiles * self.vision.positions, "int64", name="repeat_interleave.index")
        repeated = e.new(numel, "int64", name="cross_attention_mask.repeat_interleave")
        del index
        as_float = e.new(numel, "fp32", name="1.0-cross_attention_mask")
        del repeated
        inverted = ops.cast(e, as_float, dtype, name="inverted_cross_attn_mask")
        del as_float
        as_bool = e.new(numel, "bool", name="inverted.to(bool)")
        mask = e.new(numel, dtype, name="cross_attention_mask")
        del as_bool
        not_min = e.new(numel, "bool", name="mask!=min")
        rows = e.new(self.tokens, "bool", name="mask.any")
        del not_min
        row_mask = e.new(self.tokens, dtype, name="full_text_row_masked_out_mask")
        del rows, inverted
        return mask, row_mask

    def language(self, e: Engine, x: T) -> T:
        """MllamaTextModel.forward: position_ids (arange), the causal mask (eager only), RoPE tables of (1, seq,
        head_dim), the layers (cross-attention layers skipped without images), the final norm; MllamaModel.forward
        then returns and its locals (vision output, image features, masks) go unless checkpointed layers keep
        them."""
        hd = self.setup.model.text.head_dim
        ctx = Context(tokens=self.tokens, attention=LMAttention(self.setup, self.batch, self.seq))
        ctx.seq, ctx.eager = self.seq, self.setup.attn == "eager"
        ctx.cross, ctx.cross_mask, ctx.row_mask = self.cross, self.cross_mask, self.row_mask
        self.cross = self.cross_mask = self.row_mask = None
        ctx.position_ids = e.new(self.seq, "int64", name="position_ids")
        if ctx.eager:
            ctx.attention.mask = e.new(self.batch * self.seq * self.seq, x.dtype, name="causal_mask")
        ctx.cos = e.new(self.seq * hd, x.dtype, name="cos")
        ctx.sin = e.new(self.seq * hd, x.dtype, name="sin")
        for layer in self.layers:
            if isinstance(layer, MllamaCrossLayer) and ctx.cross is None:
                continue
            x = self._run_layer(e, layer, x, ctx)
        out = ops.rms_norm(e, x, self.norm, self.tokens, name="norm")
        del x, ctx  # MllamaTextModel/MllamaModel.forward return: position ids, masks and image features go
        self._keep = ()
        return out


MODELS = {"mllama": MllamaModel}


def _head_norm(e: Engine, x: T, weight, rows: int, name: str) -> T:
    """MllamaTextRMSNorm on `proj(x).view(...).transpose(1, 2)`; Liger's LigerRMSNorm (in place) copies the transposed
    input first (planner/memory/liger.py `rms_norm`, `transposed`)."""
    if "rms_norm" in e.liger:
        from ...memory import liger

        return liger.rms_norm(e, x, weight, rows, name=name, in_place=True, transposed=True)
    return ops.rms_norm(e, x, weight, rows, name=name)
