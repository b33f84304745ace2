"""InternVL3 in the transformers-native format (transformers models/internvl/modeling_internvl.py): InternViT with
layer scale (and, for the 6B tower, RMSNorm and q/k-norm), 0.5 pixel shuffle, a LayerNorm + Linear-GELU-Linear
projector and a Qwen2 language model (the shared `LlamaLayer`, with LLaVA's dtype-faithful eager attention).

Mirrors transformers 5.23 models/internvl/modeling_internvl.py.
"""

from __future__ import annotations

from ...memory import ops
from ...memory.blocks import Context, Params, apply_linear
from ...memory.model import BaseModel, ConditionalGenerationStep
from ...memory.sim import Engine, Node, T
from ...memory.vision import VisionContext
from ...modules import PROJECTOR, VISION
from ...setup import TrainSetup
from ..llava.memory import LlamaAttention


class InternVitLayer:
    """InternVLVisionLayer: x + lambda_1 * attention(layernorm_before(x)); then
    h + lambda_2 * mlp(layernorm_after(h)). InternVLVisionAttention: q/k/v_proj, q_norm/k_norm (RMSNorm over the
    whole width, 6B tower only), attention over each tile, projection_layer."""

    def __init__(self, p: Params, index: int) -> None:
        v = p.setup.model.vision
        self.v = v
        d, prefix = v.hidden_size, f"vision.layer.{index}"
        self.norms = {}
        for name in ("layernorm_before", "layernorm_after"):
            weight = p.vector(VISION, f"{prefix}.{name}.weight", d)
            bias = p.vector(VISION, f"{prefix}.{name}.bias", d) if v.norm == "layernorm" else None
            self.norms[name] = (weight, bias)
        self.q = p.linear(VISION, f"{prefix}.attention.q_proj", d, d, v.qkv_bias)
        self.k = p.linear(VISION, f"{prefix}.attention.k_proj", d, d, v.qkv_bias)
        self.v_proj = p.linear(VISION, f"{prefix}.attention.v_proj", d, d, v.qkv_bias)
        self.o = p.linear(VISION, f"{prefix}.attention.projection_layer", d, d, True)
        self.q_norm = p.vector(VISION, f"{prefix}.attention.q_norm.weight", d) if v.qk_norm else None
        self.k_norm = p.vector(VISION, f"{prefix}.attention.k_norm.weight", d) if v.qk_norm else None
        self.fc1 = p.linear(VISION, f"{prefix}.mlp.fc1", d, v.intermediate_size, True)
        self.fc2 = p.linear(VISION, f"{prefix}.mlp.fc2", v.intermediate_size, d, True)
        self.lambda_1 = p.vector(VISION, f"{prefix}.lambda_1", d)
        self.lambda_2 = p.vector(VISION, f"{prefix}.lambda_2", d)
        self.params = [q for pair in self.norms.values() for q in pair if q is not None] + [
            q for q in (self.q_norm, self.k_norm, self.lambda_1, self.lambda_2) if q is not None] + [
            q for lp in (self.q, self.k, self.v_proj, self.o, self.fc1, self.fc2)
            for q in lp.tensors]

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)

    def _norm(self, e: Engine, x: T, name: str, tokens: int) -> T:
        weight, bias = self.norms[name]
        if bias is not None:
            return ops.layer_norm(e, x, weight, bias, tokens, name=name)
        return ops.rms_norm(e, x, weight, tokens, name=name)

    def __call__(self, e: Engine, x: T, ctx) -> T:
        v = self.v
        tokens = ctx.tokens
        # `self.attention(self.layernorm_before(hidden_states))`: the normed input lives until attention returns
        h = self._norm(e, x, "layernorm_before", tokens)
        q = apply_linear(e, h, self.q, "q_proj")
        k = apply_linear(e, h, self.k, "k_proj")
        value = apply_linear(e, h, self.v_proj, "v_proj")
        if self.q_norm is not None:
            q_normed = ops.rms_norm(e, q, self.q_norm, tokens, name="q_norm")
            del q
            k_normed = ops.rms_norm(e, k, self.k_norm, tokens, name="k_norm")
            del k
            q, k = q_normed, k_normed
            del q_normed, k_normed
        attn, weights = ctx.attention(e, q, k, value, v.num_heads, "attention")
        del q, k, value
        o = apply_linear(e, attn, self.o, "projection_layer")
        del attn, h
        # `attention_output = self.lambda_1 * attention_output` stays referenced until the layer returns
        scaled = ops.mul_param(e, self.lambda_1, o, name="lambda_1*attn")
        del o
        x = ops.add(e, scaled, x, name="attn_residual")
        h = self._norm(e, x, "layernorm_after", tokens)
        f = apply_linear(e, h, self.fc1, "fc1")
        del h
        a = ops.unary(e, v.mlp, f, name="act")
        del f
        m = apply_linear(e, a, self.fc2, "fc2")
        del a
        scaled_mlp = ops.mul_param(e, self.lambda_2, m, name="lambda_2*mlp")
        del m
        out = ops.add(e, scaled_mlp, x, name="mlp_residual")
        # `attention_output, _ = self.attention(...)`: the weights (eager) live until the layer returns
        del scaled_mlp, x, scaled, weights
        return out


class TileAttention:
    """Attention over a batch of tiles, one kernel call (tiles are the batch dimension). sdpa: the CUDA fused
    kernel. eager: InternVL's `eager_attention_forward`, whose softmax takes no dtype (under autocast it runs in fp32,
    its input converted first, and the matmul with V casts the weights back); it returns the attention weights."""

    def __init__(self, setup: TrainSetup, tiles: int, length: int) -> None:
        self.setup, self.tiles, self.length = setup, tiles, length

    def __call__(self, e: Engine, q: T, k: T, v: T, heads: int, name: str) -> tuple[T, T | None]:
        if self.setup.attn != "eager" and (q.dtype != "fp32" or e.autocast):
            if e.autocast:
                q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
            return ops.fused_attention(e, q, k, v, heads, self.tiles * self.length, name=name), None
        scores_numel = self.tiles * heads * self.length * self.length
        if e.autocast:  # matmul is on the lower-precision list
            q, k = (ops.cast(e, t, e.autocast) for t in (q, k))
        scores = e.new(scores_numel, q.dtype, name=f"{name}.scores")
        e.record(Node("matmul", [t for t in (q, k) if t.rg], [q, k] if (q.rg or k.rg) else [], []), scores)
        scaled = ops.scale(e, scores, name=f"{name}.scaled")
        del scores
        softmax_in = ops.cast(e, scaled, "fp32", name=f"{name}.scores_fp32") if e.autocast else scaled
        probs = e.new(scores_numel, softmax_in.dtype, name=f"{name}.softmax")
        e.record(Node("softmax", [softmax_in] if softmax_in.rg else [], [probs], []), probs)
        del scaled, softmax_in
        weights = ops.cast(e, probs, e.autocast, name=f"{name}.probs") if e.autocast else probs
        value = ops.cast(e, v, e.autocast, name=f"{name}.v_cast") if e.autocast else v
        out = e.new(q.numel, weights.dtype, name=f"{name}.pv")
        e.record(Node("matmul", [t for t in (weights, value) if t.rg],
                      [weights, value] if (weights.rg or value.rg) else [], []), out)
        del weights, value
        contiguous = e.new(out.numel, out.dtype, name=name)
        e.record(Node("contiguous", [out] if out.rg else [], [], []), contiguous)
        return contiguous, probs


class InternVLModel(ConditionalGenerationStep, BaseModel):
    """InternVLForConditionalGeneration: InternViT over every tile, the CLS token dropped ("default" strategy),
    pixel shuffle, the projector, then the Qwen2 language model."""

    keeps_checkpoint_arguments = True

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        spec = setup.model
        v, proj = spec.vision, spec.projector
        layers = (counts or {}).get("vision", v.num_layers)
        full = self.p.full(VISION)
        dt = self.p._dtype(full)
        d = v.hidden_size
        # InternVLVisionEmbeddings: cls_token, patch conv (with bias), absolute position embeddings (CLS included)
        self.cls = e.param("vision.embeddings.cls_token", d, dt, full, VISION, shape=(1, 1, d))
        self.patch = e.param("vision.embeddings.patch_embeddings.projection.weight",
                             v.in_channels * v.patch_size ** 2 * d, dt, full, VISION,
                             shape=(d, v.in_channels, v.patch_size, v.patch_size))
        self.patch_bias = e.param("vision.embeddings.patch_embeddings.projection.bias", d, dt, full, VISION)
        self.grid = (v.image_size // v.patch_size) ** 2
        self.pos = e.param("vision.embeddings.position_embeddings", (self.grid + 1) * d, dt, full, VISION,
                           shape=(1, self.grid + 1, d))
        self.vision_layers = [InternVitLayer(self.p, i) for i in range(layers)]
        # InternVLMultiModalProjector
        self.proj_norm = (self.p.vector(PROJECTOR, "multi_modal_projector.layer_norm.weight", proj.in_features),
                          self.p.vector(PROJECTOR, "multi_modal_projector.layer_norm.bias", proj.in_features))
        self.linear_1 = self.p.linear(PROJECTOR, "multi_modal_projector.linear_1", proj.in_features,
                                      proj.out_features, True)
        self.linear_2 = self.p.linear(PROJECTOR, "multi_modal_projector.linear_2", proj.out_features,
                                      proj.out_features, True)
        self.tiles = sum(t.views for t in setup.image_tokens()) * self.batch

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        if self.tiles:
            inputs["pixel_values"] = e.new(self.tiles * v.in_channels * v.image_size ** 2, "fp32",
                                           name="pixel_values", category="inputs/batch")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        x = self.embed_tokens(e)
        self._keep, self._outputs = (), ()
        if not self.tiles:
            return x
        e.scope = "vision"
        v, proj = self.setup.model.vision, self.setup.model.projector
        d = v.hidden_size
        length = self.grid + 1
        tokens = self.tiles * length
        # get_image_features: `pixel_values.to(dtype=self.dtype)` (the dtype of the first parameter, the CLS token);
        # the local keeps the copy alive until the projector returns
        pixels = ops.cast(e, inputs["pixel_values"], self.cls.dtype, name="pixel_values:cast")
        patches = ops.patch_conv(e, pixels, self.patch, self.patch_bias, self.tiles * self.grid * d, "patch_embeddings")
        patches = e.hook_input(patches)  # InternVLVisionModel.get_input_embeddings() is embeddings.patch_embeddings
        # torch.cat((cls_tokens, embeddings), dim=1): autocast promotes to the widest dtype
        cat = e.new(tokens * d, ops.promote(patches.dtype, self.cls.dtype), name="embeddings.cat")
        e.record(Node("cat", [patches] if patches.rg else [], [], [self.cls] if self.cls.trainable else []), cat)
        del patches
        # + position_embeddings (the parameter itself: no interpolation at the native size)
        hidden = e.new(cat.numel, ops.promote(cat.dtype, self.pos.dtype), name="embeddings")
        e.record(Node("add", [cat] if cat.rg else [], [], [self.pos] if self.pos.trainable else []), hidden)
        del cat
        ctx = VisionContext(tokens, TileAttention(self.setup, self.tiles, length))
        embedding_output = hidden  # InternVLVisionModel.forward keeps it referenced until the encoder returns
        for layer in self.vision_layers:
            hidden = self._run_layer(e, layer, hidden, ctx)
        del ctx, embedding_output
        # vision_features[:, 1:, :] and the reshape to (tiles, 32, 32, d) are views; pixel_shuffle makes two
        # contiguous copies (permute(0, 2, 1, 3).contiguous() twice), the first dies with the second
        features = hidden.view(self.tiles * self.grid * d, name="vision_features")
        first = ops._copy(e, features, features.numel, "pixel_shuffle.permute1")
        del features
        shuffled = ops._copy(e, first, first.numel, "pixel_shuffle.permute2")
        del first
        e.scope = "projector"
        merged = self.tiles * self.grid // proj.pixel_shuffle ** 2
        normed = ops.layer_norm(e, shuffled, self.proj_norm[0], self.proj_norm[1], merged,
                                name="multi_modal_projector.layer_norm")
        del shuffled
        a = apply_linear(e, normed, self.linear_1, "linear_1")
        del normed
        g = ops.unary(e, "gelu", a, name="act")
        del a
        image_features = apply_linear(e, g, self.linear_2, "linear_2")
        del g, pixels
        e.scope = "language"
        # InternVLModel.forward: image_features.to(inputs_embeds.dtype), masked_scatter; the vision outputs
        # (last_hidden_state, pooler_output), the cast features and the placeholder mask stay referenced until the
        # language model returns
        cast = ops.cast(e, image_features, x.dtype, name="image_features:cast")
        mask = e.new(self.tokens, "bool", name="special_image_mask")
        out = ops.masked_scatter(e, x, mask, cast, "inputs_embeds:scatter")
        self._keep = (hidden, image_features, mask)
        self._outputs = (cast,)  # image_hidden_states
        return out

    def language(self, e: Engine, x: T) -> T:
        """Qwen2Model.forward: position_ids = arange(seq).unsqueeze(0) (alive until it returns, and in checkpointed
        layers' keyword arguments), the causal mask (eager only: (batch, 1, seq, seq) in the embeddings' dtype), RoPE
        tables of one row, the decoder layers (eager attention dtype-faithful, as LLaVA's LLaMA), the final norm."""
        ctx = Context(tokens=self.tokens, attention=LlamaAttention(self.setup, self.batch, self.seq))
        ctx.position_ids = e.new(self.seq, "int64", name="position_ids")
        if self.setup.attn == "eager":
            ctx.attention.mask = e.new(self.batch * self.seq * self.seq, x.dtype, name="causal_mask")
        ctx.cos, ctx.sin = self.rotary(e, x)
        for layer in self.layers:
            x = self._run_layer(e, layer, x, ctx)
        out = ops.rms_norm(e, x, self.norm, self.tokens, name="norm")
        del x, ctx  # the mask, RoPE tables and position ids are locals of the forward until it returns
        self._keep = ()  # InternVLModel.forward returns: the vision outputs and the placeholder mask die
        return out

    def rotary(self, e: Engine, x: T) -> tuple[T, T]:
        """Qwen2RotaryEmbedding on position_ids of shape (1, seq): cos and sin of (1, seq, head_dim) whatever the
        batch, cast to the hidden states' dtype."""
        hd = self.setup.model.text.head_dim
        return e.new(self.seq * hd, x.dtype, name="cos"), e.new(self.seq * hd, x.dtype, name="sin")


MODELS = {"internvl": InternVLModel}
