"""PaliGemma 2: SigLIP vision tower, one Linear projector, Gemma 2 language model with the image prefix attending
bidirectionally (transformers models/paligemma/modeling_paligemma.py, models/siglip/modeling_siglip.py,
models/gemma2/modeling_gemma2.py).

What differs from the LLaMA-style models of model.py:
- Gemma 2 has no SDPA path (`Gemma2PreTrainedModel._supports_sdpa = False`: SDPA cannot soft-cap the logits), so its
  attention is eager whatever `--attn` says (sdpa is what transformers refuses / resolves to eager; the tracer does the
  same, profiler/build.py `_eager_where_no_sdpa`): scores are soft-capped (/50, tanh, *50) and a (batch, 1, seq, seq)
  additive mask is added. PaliGemmaModel builds two masks, full and sliding-window, in the embeddings' dtype; with
  LLaMA-Factory's `token_type_ids` (0 on the image tokens) both let the image prefix attend bidirectionally.
- Gemma2RMSNorm computes in fp32 and multiplies by (1 + weight) before casting back; each decoder layer has four.
- The embeddings are scaled by sqrt(hidden) and the logits soft-capped (/30, tanh, *30) before the loss.
The SigLIP tower is families/siglip.py.

Mirrors transformers 5.23 models/paligemma/modeling_paligemma.py and models/gemma2/modeling_gemma2.py.
"""

from __future__ import annotations

from ...memory import ops
from ...memory.blocks import Params, TextDecoderLayer, apply_linear
from ...memory.gemma import GemmaInputs
from ...memory.model import BaseModel, ConditionalGenerationStep
from ...memory.siglip import SiglipVision
from ...memory.sim import Engine, Node, T
from ...modules import LANGUAGE, PROJECTOR
from ...setup import Train, TrainSetup

# Gemma2Config defaults (PaliGemma 2 configs keep them): attn_logit_softcapping, final_logit_softcapping
ATTN_SOFTCAP, FINAL_SOFTCAP = 50.0, 30.0


# Building blocks ----------------------------------------------------------------------------------------------------


def softcapped_eager_attention(e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, q_len: int, k_len: int,
                               batch: int, mask: T | None, softcap: float | None, name: str = "") -> tuple[T, T]:
    """gemma2 `eager_attention_forward`: repeat_kv, q @ k^T * scaling, soft-capping (/cap, tanh, *cap), + mask,
    softmax in fp32 (a bf16 input is converted first), `.to(query.dtype)`, @ v, transpose(1, 2).contiguous().
    Under autocast both matmuls cast fp32 operands to the half dtype (with fp32 hidden states, full training, the
    RoPE'd q/k and the fp32 mask make q, k, the scores and the weights fp32). Returns the output and the attention
    weights (the caller keeps them: `hidden_states, _ = self.self_attn(...)`)."""
    groups = heads // kv_heads
    key = ops._copy(e, k, k.numel * groups, f"{name}.k_rep") if groups > 1 else k
    value = ops._copy(e, v, v.numel * groups, f"{name}.v_rep") if groups > 1 else v
    scores_numel = batch * heads * q_len * k_len
    qa, ka = ops.input_for_matmul(e, q), ops.input_for_matmul(e, key)
    scores = e.new(scores_numel, e.autocast or ops.promote(q.dtype, key.dtype), name=f"{name}.scores")
    e.record(Node("matmul", [t for t in (qa, ka) if t.rg], [qa, ka] if (qa.rg or ka.rg) else [], []), scores)
    del qa, ka
    weights = ops.scale(e, scores, name=f"{name}.scaled")
    del scores
    if softcap is not None:
        divided = ops.scale(e, weights, name=f"{name}.softcap_div")
        del weights
        capped = e.new(scores_numel, divided.dtype, name=f"{name}.tanh")
        e.record(Node("tanh", [divided] if divided.rg else [], [capped], []), capped)
        del divided
        weights = ops.scale(e, capped, name=f"{name}.softcap_mul")
        del capped
    if mask is not None:
        masked = ops.add(e, weights, mask, name=f"{name}.masked")
        del weights
        weights = masked
        del masked
    as32 = ops.cast(e, weights, "fp32", name=f"{name}.scores_fp32")  # softmax(dtype=float32) converts its input
    probs = e.new(scores_numel, "fp32", name=f"{name}.softmax")
    e.record(Node("softmax", [as32] if as32.rg else [], [probs], []), probs)
    del as32
    probs_cast = ops.cast(e, probs, q.dtype, name=f"{name}.probs")
    del weights, probs
    pa, va = ops.input_for_matmul(e, probs_cast), ops.input_for_matmul(e, value)
    out = e.new(q.numel, e.autocast or ops.promote(pa.dtype, va.dtype), name=f"{name}.pv")
    e.record(Node("matmul", [t for t in (pa, va) if t.rg], [pa, va] if (pa.rg or va.rg) else [], []), out)
    del pa, va
    contiguous = e.new(out.numel, out.dtype, name=name)
    e.record(Node("contiguous", [out] if out.rg else [], [], []), contiguous)
    del out, key, value
    return contiguous, probs_cast


# Gemma 2 language model ---------------------------------------------------------------------------------------------


class Gemma2Layer(TextDecoderLayer):
    """Gemma2DecoderLayer: input_layernorm -> self_attn -> post_attention_layernorm -> residual ->
    pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm -> residual: the shared layer with Gemma's norms,
    sandwich norms and gelu-tanh MLP; its own part is the attention (no SDPA path: eager with logit soft-capping,
    or a fused kernel)."""

    norm, rope_frees, sandwich, norms_first, act = "gemma", "both", True, True, "gelu_tanh"
    attention_weights, inputs_die_before_o_proj, o_proj_bias = True, False, True

    def attention_core(self, e: Engine, q: T, k: T, v: T, ctx: "GemmaContext") -> tuple[T, T | None]:
        t, tokens = self.t, ctx.tokens
        if ctx.fused:
            return ops.fused_attention(e, q, k, v, t.num_heads, tokens, name="self_attn"), None
        return softcapped_eager_attention(e, q, k, v, t.num_heads, t.num_kv_heads, ctx.seq, ctx.seq, ctx.batch,
                                          ctx.mask, ATTN_SOFTCAP, name="self_attn")


class GemmaContext:
    """What a Gemma 2 layer gets: token counts, RoPE tables, its mask (full or sliding), the attention kind."""

    def __init__(self, tokens: int, batch: int, seq: int, cos: T, sin: T, mask: T | None, fused: bool) -> None:
        self.tokens, self.batch, self.seq = tokens, batch, seq
        self.cos, self.sin, self.mask, self.fused = cos, sin, mask, fused


# The model ----------------------------------------------------------------------------------------------------------


class PaliGemmaModel(GemmaInputs, ConditionalGenerationStep, BaseModel):
    """PaliGemmaForConditionalGeneration with a Gemma 2 language model."""

    final_logit_softcapping = FINAL_SOFTCAP

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        # BaseModel.__init__ builds LLaMA layers; the parameters are created here instead, in the same spirit
        self.e, self.setup = e, setup
        self.p = Params(e, setup)
        spec = setup.model
        t = spec.text
        text_layers = (counts or {}).get("text", t.num_layers)
        vision_layers = (counts or {}).get("vision", spec.vision.num_layers)
        self.batch, self.seq = setup.batch_size, setup.seq_len
        self.tokens = self.batch * self.seq
        first_trainable = text_layers - setup.freeze_trainable_layers if setup.method == "freeze" else 0
        lm_full = setup.trains[LANGUAGE] is Train.FULL and setup.method != "freeze"
        self.vision = SiglipVision(self, vision_layers)
        proj = spec.projector
        self.projector = self.p.linear(PROJECTOR, "multi_modal_projector.linear", proj.in_features,
                                       proj.out_features, proj.bias)
        self.embed = e.param("language.embed_tokens", (t.vocab_size + t.extra_embedding_rows) * t.hidden_size,
                             self.p._dtype(lm_full), lm_full, LANGUAGE,
                             shape=(t.vocab_size + t.extra_embedding_rows, t.hidden_size))
        # Gemma2TextScaledWordEmbedding.embed_scale: a 0-d buffer, in the dtype the model was built in
        self.embed_scale = e.param("language.embed_scale", 1, self.p.compute, False, LANGUAGE)
        self.layers = [Gemma2Layer(self.p, i, trainable=i >= first_trainable) for i in range(text_layers)]
        self.norm = self.p.vector(LANGUAGE, "language.norm", t.hidden_size, lm_full)
        self.inv_freq = [e.param(f"language.rotary_emb.{n}", t.head_dim // 2, "fp32", False, LANGUAGE)
                         for n in ("inv_freq", "original_inv_freq")]  # buffers
        self.lm_head = None  # tied to the embedding
        self.views = len(setup.images) * self.batch  # one view per image

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        """PaliGemmaModel.forward up to the language model: embeddings, 1-based position_ids, the image features
        scattered into the image placeholders; the vision outputs stay referenced (mm_encoder_outputs) until the
        forward returns, the projected features (image_hidden_states) until the outputs are dropped."""
        x = self.embed_tokens(e)
        # position_ids: arange(seq) + 0, then .unsqueeze(0) + 1; the forward passes them to every layer
        self._position_ids = e.new(self.seq, "int64", name="position_ids")
        if not self.views:
            self._keep = ()
            return x
        e.scope = "vision"
        last = self.vision(self, e, inputs["pixel_values"], self.views)
        e.scope = "projector"
        projected = apply_linear(e, last, self.projector, "multi_modal_projector.linear")
        e.scope = "language"
        features = ops.cast(e, projected, x.dtype, name="image_features")  # .to(inputs_embeds.dtype)
        mask = e.new(self.tokens, "bool", name="special_image_mask")
        count = e.new(1, "int64", name="n_image_tokens")
        del count
        out = ops.masked_scatter(e, x, mask, features, name="inputs_embeds:scatter")
        # mm_encoder_outputs["image"] (last_hidden_state, pooler_output = the projected features) and the mask live
        # until PaliGemmaModel.forward returns; image_features (image_hidden_states) until the outputs are dropped
        self._keep = (features, last, projected, mask)
        del projected, features, last, mask
        return out

    def language(self, e: Engine, x: T) -> T:
        """PaliGemmaModel.forward from the masks on, then Gemma2Model.forward: block_sequence_ids from
        token_type_ids, the full and sliding-window masks (eager: additive, (batch, 1, seq, seq) in the embeddings'
        dtype), RoPE tables (1, seq, head_dim), the layers (alternating sliding / full), the final norm."""
        t = self.setup.model.text
        block_ids = e.new(self.tokens, "int64", name="block_sequence_ids")  # torch.where(token_type_ids == 0, 0, -1)
        fused = self.setup.attn == "fa2"
        masks = {}
        for kind in ("full", "sliding"):
            if fused:
                masks[kind] = None
                continue
            built = e.new(self.batch * self.seq * self.seq, "bool", name=f"{kind}_mask_bool")
            masks[kind] = e.new(self.batch * self.seq * self.seq, x.dtype, name=f"{kind}_mask")  # torch.where
            del built
        cos = e.new(self.seq * t.head_dim, x.dtype, name="cos")
        sin = e.new(self.seq * t.head_dim, x.dtype, name="sin")
        contexts = {kind: GemmaContext(self.tokens, self.batch, self.seq, cos, sin, masks[kind], fused)
                    for kind in masks}
        for ctx in contexts.values():
            ctx.position_ids = self._position_ids  # checkpointed layers keep their arguments until backward
        self._position_ids = None
        del cos, sin, masks, ctx
        pattern = t.sliding_window_pattern or 1
        for index, layer in enumerate(self.layers):
            # Gemma2Config.layer_types: every `pattern`-th layer (index % 2 == 1 for Gemma 2) is full attention
            kind = "full" if (index + 1) % pattern == 0 else "sliding"
            x = self._run_layer(e, layer, x, contexts[kind])
        del layer
        out = ops.gemma_rms_norm(e, x, self.norm, self.tokens, name="norm")
        del x, block_ids, contexts  # PaliGemmaModel.forward returns: its masks and position_ids go
        # PaliGemmaModel.forward returns: only image_hidden_states stays (outputs)
        self._outputs, self._keep = self._keep[:1], None
        return out


MODELS = {"paligemma": PaliGemmaModel}
