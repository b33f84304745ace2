"""Gemma 3 (transformers models/gemma3/modeling_gemma3.py, models/siglip/modeling_siglip.py): a SigLIP tower at
896 px, Gemma3MultiModalProjector (4x4 average pool, RMSNorm, matmul with a plain weight) and the Gemma 3 language
model.

What differs from the LLaMA-style models of model.py:
- The embeddings are scaled (`embedding(ids) * embed_scale.to(weight dtype)`), every RMSNorm computes in fp32 and
  multiplies by (1 + weight) before casting back, each decoder layer has four of them plus q/k norms over head_dim,
  and the MLP is gelu-tanh gated.
- With LLaMA-Factory's `token_type_ids` (1 on image tokens; every batch carries them), Gemma3Model builds two
  (batch, 1, seq, seq) masks before the language model: full attention OR bidirectional-within-each-image, and the
  same AND the sliding window (`create_masks_for_vision_model`). With a mask, transformers' sdpa path expands K/V
  with `repeat_kv` (no `enable_gqa`) and CUDA cannot use FlashAttention: cuDNN attention takes the mask as an
  additive bias of the query dtype (emulate.py `_masked_sdpa`), built per call and kept for backward with the
  expanded K/V. Eager attention adds the masks, which are float in the embeddings' dtype.
- SigLIP and the decoder layers keep the attention weights they return (`hidden_states, _ = self.self_attn(...)`)
  until the layer returns: only eager attention has any.
The language model has no logit soft-capping (Gemma3ForConditionalGeneration applies none) and ties lm_head to the
262k-row embedding, so the loss buffers are the largest transients.

Mirrors transformers 5.23 models/gemma3/modeling_gemma3.py and models/siglip/modeling_siglip.py.
"""

from __future__ import annotations

from ...memory import ops
from ...memory.blocks import TextDecoderLayer, apply_linear
from ...memory.gemma import GemmaInputs
from ...memory.model import BaseModel, ConditionalGenerationStep
from ...memory.siglip import SiglipLayer, SiglipVision
from ...memory.sim import Engine, Node, T
from ...modules import LANGUAGE, PROJECTOR
from ...setup import TrainSetup

# SigLIP vision tower (families/siglip.py), as the Gemma 3 estimate runs it ------------------------------------------


def siglip_attention(setup: TrainSetup, length: int):
    """Bidirectional attention over a batch of sequences of `length` tokens in one call, no mask. sdpa: the CUDA
    fused kernel; eager: siglip `eager_attention_forward` (scores * scale, softmax in fp32 with its input converted
    first, cast back, @ v, transpose(1, 2).contiguous()), which also returns the attention weights."""

    def attention(e: Engine, q: T, k: T, v: T, heads: int, tokens: int, name: str) -> tuple[T, T | None]:
        if e.autocast:
            q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
        if setup.attn != "eager" and q.dtype != "fp32":
            return ops.fused_attention(e, q, k, v, heads, tokens, name=name), None
        return eager_attention(e, q, k, v, heads, heads, length, tokens // length, None, name)

    return attention


def repeat_kv(e: Engine, x: T, heads: int, kv_heads: int, name: str) -> T:
    """transformers `repeat_kv`: `x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)`, a copy to
    every query head, except with a single K/V head (the reshape is then a stride-0 view)."""
    if heads == kv_heads or kv_heads == 1:
        return x if heads == kv_heads else x.view(x.numel * heads, name=f"{name}.{x.name}_rep")
    return ops._copy(e, x, x.numel * (heads // kv_heads), f"{name}.{x.name}_rep")


def eager_attention(e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, length: int, batch: int,
                    mask: T | None, name: str) -> tuple[T, T]:
    """eager_attention_forward of siglip and gemma3: repeat_kv, q @ k^T * scaling, (+ mask), softmax(dtype=fp32)
    (its input converted first) and `.to(query.dtype)`, @ v, transpose(1, 2).contiguous(); returns the output and
    the attention weights."""
    key, value = repeat_kv(e, k, heads, kv_heads, name), repeat_kv(e, v, heads, kv_heads, name)
    scores_numel = batch * heads * length * length
    scores = e.new(scores_numel, q.dtype, name=f"{name}.scores")
    e.record(Node("matmul", [t for t in (q, key) if t.rg], [q, key] if (q.rg or key.rg) else [], []), scores)
    weights = ops.scale(e, scores, name=f"{name}.scaled")
    del scores
    if mask is not None:
        masked = ops.add(e, weights, mask, name=f"{name}.masked")
        del weights
        weights = masked
        del masked
    as32 = ops.cast(e, weights, "fp32", name=f"{name}.scores_fp32")
    probs = e.new(scores_numel, "fp32", name=f"{name}.softmax")
    e.record(Node("softmax", [as32] if as32.rg else [], [probs], []), probs)
    del as32, weights
    probs_cast = ops.cast(e, probs, q.dtype, name=f"{name}.probs")
    del probs
    out = e.new(q.numel, q.dtype, name=f"{name}.pv")
    e.record(Node("matmul", [t for t in (probs_cast, value) if t.rg],
                  [probs_cast, value] if (probs_cast.rg or value.rg) else [], []), out)
    del key, value
    contiguous = e.new(out.numel, out.dtype, name=name)
    e.record(Node("contiguous", [out] if out.rg else [], [], []), contiguous)
    return contiguous, probs_cast


class Gemma3SiglipLayer(SiglipLayer):
    """SiglipEncoderLayer as the Gemma 3 estimate runs it: `ctx.attention` returns the output and the attention
    weights, which (eager) live until the layer returns (`hidden_states, _ = self.self_attn(...)`); q, k and v go
    as soon as the attention returns. The normed input is the attention's argument until it returns, and the MLP's
    until the MLP returns."""

    def __call__(self, e: Engine, x: T, ctx) -> T:
        residual = x
        h = ops.layer_norm(e, x, self.ln1[0], self.ln1[1], ctx.tokens, name="layer_norm1")
        q = apply_linear(e, h, self.q, "q_proj")
        k = apply_linear(e, h, self.k, "k_proj")
        value = apply_linear(e, h, self.v_proj, "v_proj")
        attn, weights = ctx.attention(e, q, k, value, self.v.num_heads, ctx.tokens, "self_attn")
        del q, k, value
        o = apply_linear(e, attn, self.o, "out_proj")
        del attn, h  # SiglipAttention.forward returns
        x = ops.add(e, residual, o, name="attn_residual")
        del residual, o
        residual = x
        h = ops.layer_norm(e, x, self.ln2[0], self.ln2[1], ctx.tokens, name="layer_norm2")
        del x
        f = apply_linear(e, h, self.fc1, "fc1")
        a = ops.unary(e, self.v.mlp, f, name="act")
        del f
        m = apply_linear(e, a, self.fc2, "fc2")
        del a, h  # SiglipMLP.forward returns
        out = ops.add(e, residual, m, name="mlp_residual")
        del residual, m, weights  # `hidden_states, _ = self.self_attn(...)`: the weights live until the layer returns
        return out


class Gemma3Siglip(SiglipVision):
    """SiglipVisionModel (no head) with `Gemma3SiglipLayer` and the patch Conv2d as CUDA autocast runs it
    (`ops.patch_conv` with `valid_padding`)."""

    layer = Gemma3SiglipLayer

    def patch_embeds(self, e: Engine, pixels: T, out_numel: int) -> T:
        return ops.patch_conv(e, pixels, self.patch, self.patch_bias, out_numel, "patch_embeds", valid_padding=True)


# Gemma 3 language model ---------------------------------------------------------------------------------------------


class Gemma3Layer(TextDecoderLayer):
    """Gemma3DecoderLayer: input_layernorm -> self_attn (q/k/v_proj, q_norm/k_norm, RoPE, attention, o_proj) ->
    post_attention_layernorm -> residual -> pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm ->
    residual: the shared layer with Gemma's norms, q/k norm after the projections, sandwich norms and the gelu-tanh
    Gemma3MLP; the context's attention (with the layer's full or sliding mask) returns the weights."""

    norm, qk_norm, rope_frees, sandwich, norms_first = "gemma", "attention", "both", True, True
    attn_prefix, mlp_prefix, act = "self_attn.", "mlp.", "gelu_tanh"
    attention_weights, inputs_die_before_o_proj, o_proj_bias = True, False, True


class Gemma3Attention:
    """The language model's attention, with the layer's mask (full or sliding).

    sdpa (transformers `sdpa_attention_forward`): with a mask there is no `enable_gqa`, so `repeat_kv` copies K and V
    to every query head; in the kernel call autocast casts q, k, v; torch turns the bool mask into an additive bias of
    the query dtype (a transient bool `logical_not`, then the bias: aten `convert_boolean_attn_mask_cudnn`) and cuDNN
    attention saves q, k, v, the output, a fp32 logsumexp and the bias, its backward workspace being the same as
    without a mask. eager: gemma3 `eager_attention_forward` with the float mask."""

    def __init__(self, setup: TrainSetup, batch: int, seq: int, mask: T) -> None:
        self.setup, self.batch, self.seq, self.mask = setup, batch, seq, mask

    def __call__(self, e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, name: str) -> tuple[T, T | None]:
        if self.setup.attn == "eager":
            return eager_attention(e, q, k, v, heads, kv_heads, self.seq, self.batch, self.mask, name)
        key, value = repeat_kv(e, k, heads, kv_heads, name), repeat_kv(e, v, heads, kv_heads, name)
        if e.autocast:
            q, key, value = (ops.cast(e, t, e.autocast) for t in (q, key, value))
        if q.dtype == "fp32":
            # no cuDNN kernel for fp32: torch's math path, the scores materialized like eager attention
            out, _ = eager_attention(e, q, key, value, heads, heads, self.seq, self.batch, self.mask, name)
            return out, None
        cells = self.batch * self.seq * self.seq
        inverted = e.new(cells, "bool", name=f"{name}.mask_not")
        zero = e.new(1, q.dtype, name=f"{name}.zero")
        bias = e.new(cells, q.dtype, name=f"{name}.attn_bias")
        del inverted, zero
        out = e.new(q.numel, q.dtype, name=name)
        tokens = self.batch * self.seq
        lse = e.new(heads * tokens, "fp32", name=f"{name}.lse")
        inputs = [t for t in (q, key, value) if t.rg]
        e.record(Node("sdpa_masked", inputs, [q, key, value, out, lse, bias] if inputs else [], [],
                      workspace=q.numel * 4 + heads * tokens * 4), out)
        del lse, bias, key, value
        return out, None


class LayerContext:
    """What a Gemma 3 layer gets: the token count, the RoPE tables, the attention with the mask of its type and
    position_ids. Checkpointed layers keep all of them (their forward arguments) until their backward."""

    def __init__(self, tokens: int, cos: T, sin: T, attention: Gemma3Attention, position_ids: T) -> None:
        self.tokens, self.cos, self.sin, self.attention = tokens, cos, sin, attention
        self.position_ids = position_ids


def reduced_pattern(num_layers: int, pattern: int) -> int:
    """The sliding-window pattern of a copy with `num_layers` layers (traces and extrapolated simulations run a few
    layers): fewer layers than the pattern make the last one global, so both layer types (each with its RoPE tables
    and inv_freq buffers) are present, as in the full model; a sliding and a global layer cost the same otherwise."""
    return num_layers if pattern and num_layers < pattern else pattern


def layer_types(num_layers: int, pattern: int) -> list[str]:
    """Gemma3TextConfig.layer_types: every `pattern`-th layer is full attention, the others sliding-window."""
    pattern = reduced_pattern(num_layers, pattern)
    return ["full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)]


def spec_with_layers(spec, counts: dict[str, int]):
    """`model.spec_with_layers`, with the reduced spec's sliding-window pattern from `reduced_pattern`."""
    from dataclasses import replace

    from ...memory.model import spec_with_layers as default

    reduced = default(spec, counts)
    pattern = reduced_pattern(reduced.text.num_layers, spec.text.sliding_window_pattern)
    return replace(reduced, text=replace(reduced.text, sliding_window_pattern=pattern))


# The model ----------------------------------------------------------------------------------------------------------


class Gemma3Model(GemmaInputs, ConditionalGenerationStep, BaseModel):
    """Gemma3ForConditionalGeneration."""

    keeps_checkpoint_arguments = True

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, dict(counts or {}, text=0))  # embedding, final norm; Gemma 3 layers below
        spec = setup.model
        t, v, proj = spec.text, spec.vision, spec.projector
        text_layers = (counts or {}).get("text", t.num_layers)
        vision_layers = (counts or {}).get("vision", v.num_layers)
        first_trainable = text_layers - setup.freeze_trainable_layers if setup.method == "freeze" else 0
        self.layers = [Gemma3Layer(self.p, i, trainable=i >= first_trainable) for i in range(text_layers)]
        self.types = layer_types(text_layers, t.sliding_window_pattern)
        # Gemma3TextScaledWordEmbedding.embed_scale (a 0-d buffer, in the load dtype); Gemma3RotaryEmbedding keeps
        # inv_freq and original_inv_freq (fp32) per layer type present (BaseModel made one pair)
        self.embed_scale = e.param("language.embed_scale", 1, self.p.compute, False, LANGUAGE)  # cast with the model
        self.buffers += [e.param(f"language.rotary_emb.{kind}.{n}", t.head_dim // 2, "fp32", False, LANGUAGE)
                         for kind in sorted(set(self.types))[1:] for n in ("inv_freq", "original_inv_freq")]
        self.vision_tower = Gemma3Siglip(self, vision_layers)  # SiglipVisionModel (no head)
        d = v.hidden_size
        # Gemma3MultiModalProjector: mm_soft_emb_norm and the plain mm_input_projection_weight (never LoRA)
        self.soft_emb_norm = self.p.vector(PROJECTOR, "multi_modal_projector.mm_soft_emb_norm.weight", d)
        self.projection = self.p.vector(PROJECTOR, "multi_modal_projector.mm_input_projection_weight",
                                        proj.in_features * proj.out_features,
                                        shape=(proj.in_features, proj.out_features))
        self.views = sum(image.views for image in setup.image_tokens()) * self.batch

    # Vision tower and projector ---------------------------------------------------------------------------------
    def vision(self, e: Engine, pixel_values: T) -> tuple[T, T]:
        """SiglipVisionModel.forward (`Gemma3Siglip`); returns the last hidden state and the projected features
        (Gemma3MultiModalProjector)."""
        tower = self.vision_tower
        last = tower(self, e, pixel_values, self.views, siglip_attention(self.setup, tower.positions))
        e.scope = "projector"
        return last, self.project(e, last)

    def project(self, e: Engine, last: T) -> T:
        """Gemma3MultiModalProjector.forward: transpose/reshape to (views, d, 64, 64) and `.contiguous()` (a copy),
        AvgPool2d to 16x16 (saves its input for backward), flatten/transpose (views), mm_soft_emb_norm,
        `torch.matmul(normed, mm_input_projection_weight)` under autocast, `.type_as(vision_outputs)`."""
        spec = self.setup.model
        d, out_features = spec.vision.hidden_size, spec.projector.out_features
        rows = self.views * spec.processor.tokens_per_view
        contiguous = ops._copy(e, last, last.numel, "projector.contiguous")
        pooled = e.new(rows * d, contiguous.dtype, name="projector.avg_pool")
        e.record(Node("avg_pool2d", [contiguous] if contiguous.rg else [], [contiguous] if contiguous.rg else [],
                      []), pooled)
        del contiguous
        normed = ops.gemma_rms_norm(e, pooled, self.soft_emb_norm, rows, name="mm_soft_emb_norm")
        del pooled
        projected = ops.linear(e, normed, self.projection, out_features, name="mm_input_projection")
        del normed
        return ops.cast(e, projected, last.dtype, name="projector.type_as")

    # Forward ----------------------------------------------------------------------------------------------------
    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        """Gemma3Model.forward up to the masks: the scaled embeddings, the image features scattered into the image
        placeholders; the vision outputs stay referenced (mm_encoder_outputs) until the forward returns, the cast
        features (image_hidden_states) until the outputs are dropped."""
        x = self.embed_tokens(e)
        self._keep, self._outputs = (), ()
        if not self.views:
            return x
        e.scope = "vision"
        last, features = self.vision(e, inputs["pixel_values"])
        e.scope = "language"
        cast = ops.cast(e, features, x.dtype, name="image_features")  # pooler_output.to(inputs_embeds.dtype)
        mask = e.new(self.tokens, "bool", name="special_image_mask")
        out = ops.masked_scatter(e, x, mask, cast, "inputs_embeds:scatter")
        self._keep = (last, features, mask)
        self._outputs = (cast,)  # image_hidden_states
        return out

    def language(self, e: Engine, x: T) -> T:
        """Gemma3Model.forward from the masks on, then Gemma3TextModel.forward: block_sequence_ids from
        token_type_ids (alive until the forward returns), the full and sliding masks ((batch, 1, seq, seq) bool for
        sdpa, additive in the embeddings' dtype for eager), position_ids, the RoPE tables of each layer type present
        ((1, seq, head_dim) in the hidden dtype), the layers, the final norm."""
        t = self.setup.model.text
        block_ids = e.new(self.tokens, "int64", name="block_sequence_ids")
        cells = self.batch * self.seq * self.seq
        masks = {}
        for kind in ("full_attention", "sliding_attention"):
            built = e.new(cells, "bool", name=f"{kind}.mask")
            if self.setup.attn == "eager":
                zero = e.new(1, x.dtype, name=f"{kind}.zero")
                masks[kind] = e.new(cells, x.dtype, name=f"{kind}.additive_mask")  # eager_mask's torch.where
                del built, zero
            else:
                masks[kind] = built
                del built
        position_ids = e.new(self.seq, "int64", name="position_ids")
        contexts = {}
        for kind in sorted(set(self.types), reverse=True):  # `for layer_type in set(layer_types)`: the tables
            cos = e.new(self.seq * t.head_dim, x.dtype, name=f"{kind}.cos")
            sin = e.new(self.seq * t.head_dim, x.dtype, name=f"{kind}.sin")
            contexts[kind] = LayerContext(self.tokens, cos, sin,
                                          Gemma3Attention(self.setup, self.batch, self.seq, masks[kind]),
                                          position_ids)
            del cos, sin
        for layer, kind in zip(self.layers, self.types):
            x = self._run_layer(e, layer, x, contexts[kind])
        out = ops.gemma_rms_norm(e, x, self.norm, self.tokens, name="norm")
        # the text model returns (position_ids, RoPE tables), then Gemma3Model.forward (masks, block ids)
        del x, contexts, masks, block_ids, position_ids
        self._keep = ()  # Gemma3Model.forward returns: the vision outputs and the placeholder mask die
        return out


MODELS = {"gemma3": Gemma3Model}
