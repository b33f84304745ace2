"""MiniCPM-V 2.6 (remote code, no transformers class): an analytic model of its training step, NOT trace-validated
(the tracer needs an installed model class). It mirrors the hub repo's modeling_minicpmv.py (`MiniCPMV.forward`,
`get_vllm_embedding`), modeling_navit_siglip.py and resampler.py as read from public copies, with the same
symbolic ops as the trace-validated families.

- Vision (`vpm`, a NaViT SigLIP): every view of every image of the batch is one sequence; the views are padded to
  the longest one (`pad_sequence` on the flattened patches, then `.type(dtype)`), a patch mask hides the padding
  (an additive (views, 1, L, L) mask once views differ in length). The vision config is forced to eager attention
  unless the model uses FlashAttention-2 (`init_vision_module`), so sdpa runs eager here. Views go through the
  tower in chunks of `vision_batch_size` (16), more views than LLaMA-Factory's 768x768 cap gives one image.
- Resampler: kv_proj, ln_kv, 2D sin-cos position embedding added to the keys, nn.MultiheadAttention from 64 learned
  queries (need_weights: explicit softmax over (views * heads, 64, L)), ln_post, `@ proj`: 64 tokens per view.
- The image tokens are scattered in place into the Qwen2 embeddings, then Qwen2ForCausalLM computes the loss.

Mirrors the remote code of openbmb/MiniCPM-V-2_6 (modeling_minicpmv.py, modeling_navit_siglip.py, resampler.py).
"""

from __future__ import annotations

from ...memory import ops
from ...memory.model import BaseModel, ConditionalGenerationStep
from ...memory.siglip import SiglipVision
from ...memory.sim import Engine, Node, T
from ...memory.vision import VisionContext
from ...modules import PROJECTOR
from ...setup import TrainSetup
from ...tokens import llamafactory_preresize
from . import tokens as slicing

# config.json vision_batch_size: views per chunk through the vision tower
VISION_BATCH_SIZE = 16
# Resampler(max_size=(70, 70)): the cached 2D sin-cos table, a buffer of (70, 70, embed_dim)
RESAMPLER_POS_CACHE = 70 * 70


def view_patches(setup: TrainSetup) -> list[int]:
    """Patches of every view of one sample's images (after LLaMA-Factory's pre-resize)."""
    p = setup.model.processor
    out = []
    for width, height in setup.images:
        w, h = llamafactory_preresize(width, height, setup.image_max_pixels, setup.image_min_pixels)
        out += [(vw // p.patch_size) * (vh // p.patch_size) for vw, vh in slicing.view_sizes(p, w, h)]
    return out


class NavitSiglip(SiglipVision):
    """The NaViT SigLIP `vpm`: SigLIP parameters without the position_ids buffer (ids are bucketed per view)."""

    position_ids_buffer = False

    def run(self, model: BaseModel, e: Engine, pixels: T, views: int, length: int, padded: bool) -> T:
        v = self.v
        d = v.hidden_size
        tokens = views * length
        patches = ops.conv2d(e, pixels, self.patch, self.patch_bias, tokens * d, name="patch_embeds")
        position_ids = e.new(tokens, "int64", name="position_ids")
        pos = e.new(tokens * d, self.pos.dtype, name="position_embedding")
        e.record(Node("embedding", [], [position_ids] if self.pos.trainable else [],
                      [self.pos] if self.pos.trainable else []), pos)
        del position_ids
        hidden = ops.add(e, patches, pos, name="embeddings")
        del patches, pos
        mask = None
        if padded:  # _prepare_4d_attention_mask: (views, 1, L, L) in the hidden dtype
            mask = e.new(views * length * length, hidden.dtype, name="vision_mask")
        ctx = VisionContext(tokens, _eager(model.setup, mask, length))
        for layer in self.layers:
            hidden = model._run_layer(e, layer, hidden, ctx)
        del ctx, mask
        return ops.layer_norm(e, hidden, self.post_ln[0], self.post_ln[1], tokens, name="post_layernorm")


def _eager(setup: TrainSetup, mask: T | None, length: int):
    """The vpm's attention: eager (matmul, + mask, fp32 softmax, matmul) unless FlashAttention-2."""

    def attention(e: Engine, q: T, k: T, v: T, heads: int, tokens: int, name: str) -> T:
        if e.autocast:
            q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
        if setup.attn == "fa2":
            return ops.fused_attention(e, q, k, v, heads, tokens, name=name)
        return ops.eager_attention(e, q, k, v, heads, heads, length, length, tokens // length, mask, name=name)

    return attention


class Resampler:
    """resampler.py Resampler(num_queries=64, embed_dim=3584, num_heads=28, kv_dim=1152)."""

    def __init__(self, model: BaseModel) -> None:
        p, e = model.p, model.e
        proj = p.setup.model.projector
        d, full = proj.out_features, p.full(PROJECTOR)
        dt = p._dtype(full)
        self.d, self.queries, self.heads = d, proj.num_queries, proj.num_heads
        self.query = e.param("resampler.query", self.queries * d, dt, full, PROJECTOR, shape=(self.queries, d))
        self.kv_proj = p.linear(PROJECTOR, "resampler.kv_proj", proj.in_features, d, False)
        self.in_proj_weight = e.param("resampler.attn.in_proj_weight", 3 * d * d, dt, full, PROJECTOR,
                                      shape=(3 * d, d))
        self.in_proj_bias = e.param("resampler.attn.in_proj_bias", 3 * d, dt, full, PROJECTOR)
        self.out_proj = p.linear(PROJECTOR, "resampler.attn.out_proj", d, d, True)
        self.norms = {n: (p.vector(PROJECTOR, f"resampler.{n}.weight", d), p.vector(PROJECTOR, f"resampler.{n}.bias", d))
                      for n in ("ln_q", "ln_kv", "ln_post")}
        self.proj = e.param("resampler.proj", d * d, dt, full, PROJECTOR, shape=(d, d))
        # the 2D sin-cos position table: a buffer, cast with the model
        self.pos_cache = e.param("resampler.pos_embed", RESAMPLER_POS_CACHE * d, p.compute, False, PROJECTOR)

    def __call__(self, e: Engine, x: T, views: int, length: int) -> T:
        from ...memory.blocks import apply_linear

        d, q_len = self.d, self.queries
        keys = views * length
        padding_mask = e.new(keys, "bool", name="key_padding_mask")
        pos = e.new(keys * d, x.dtype, name="pos_embed.pad_sequence")  # per-view slices .to(dtype), padded
        kv = apply_linear(e, x, self.kv_proj, "kv_proj")
        kv = ops.layer_norm(e, kv, *self.norms["ln_kv"], keys, name="ln_kv")
        queries = ops.layer_norm(e, _param_tensor(e, self.query), *self.norms["ln_q"], q_len, name="ln_q")
        repeated = ops._copy(e, queries, q_len * views * d, "query.repeat")
        del queries
        key_in = ops.add(e, kv, pos, name="x+pos_embed")
        # multi_head_attention_forward: in-projection of q, k, v (F.linear with slices of in_proj_weight)
        q = _in_proj(e, repeated, self.in_proj_weight, self.in_proj_bias, d, "in_proj.q")
        k = _in_proj(e, key_in, self.in_proj_weight, self.in_proj_bias, d, "in_proj.k")
        v = _in_proj(e, kv, self.in_proj_weight, self.in_proj_bias, d, "in_proj.v")
        del repeated, key_in
        mask = e.new(views * self.heads * keys // views, q.dtype, name="attn_mask")  # key padding, merged per head
        scaled = ops.scale(e, q, name="q_scaled")
        weights = e.new(views * self.heads * q_len * length, q.dtype, name="baddbmm")
        e.record(Node("baddbmm", [t for t in (scaled, k) if t.rg], [scaled, k] if (scaled.rg or k.rg) else [], []),
                 weights)
        del scaled
        probs = e.new(weights.numel, weights.dtype, name="softmax")
        e.record(Node("softmax", [weights] if weights.rg else [], [probs], []), probs)
        del weights
        out = e.new(q.numel, q.dtype, name="bmm")
        e.record(Node("bmm", [t for t in (probs, v) if t.rg], [probs, v] if (probs.rg or v.rg) else [], []), out)
        averaged = e.new(views * q_len * length, probs.dtype, name="attn_weights.mean")  # need_weights: averaged
        del probs, q, k, v, mask
        flat = ops._copy(e, out, out.numel, "attn_output.contiguous")
        del out
        attn = apply_linear(e, flat, self.out_proj, "out_proj")
        del flat, averaged, kv, pos, padding_mask
        normed = ops.layer_norm(e, attn, *self.norms["ln_post"], views * q_len, name="ln_post")
        del attn
        return ops.linear(e, normed, self.proj, d, name="x@proj")


def _param_tensor(e: Engine, p) -> T:
    """A parameter used as an activation (the learned queries): a view whose gradient goes to the parameter."""
    out = p.tensor.view()
    if p.trainable:
        e.record(Node("parameter", [], [], [p]), out)
    return out


def _in_proj(e: Engine, x: T, weight, bias, d: int, name: str) -> T:
    """F.linear(x, in_proj_weight[i*d:(i+1)*d], in_proj_bias[i*d:(i+1)*d]) under autocast (the weight slice is cast
    to the half dtype, not cached: it is a view, not a leaf)."""
    xin = ops.input_for_matmul(e, x)
    w = e.new(d * d, e.autocast, name=f"{name}.weight_cast") if e.autocast and weight.dtype != e.autocast else None
    out = e.new(x.numel, e.autocast or x.dtype, name=name)  # (rows, d) -> (rows, d)
    saved = ([xin] if weight.trainable else []) + ([w if w is not None else weight.tensor] if xin.rg else [])
    e.record(Node(f"linear:{name}", [xin] if xin.rg else [], saved,
                  [q for q in (weight, bias) if q.trainable]), out)
    del xin, w
    return out


class MiniCPMVModel(ConditionalGenerationStep, BaseModel):
    """MiniCPMV (openbmb/MiniCPM-V-2_6): `vpm` NaViT SigLIP, `resampler`, `llm` Qwen2ForCausalLM. Analytic, not
    trace-validated (see the module docstring)."""

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        v = setup.model.vision
        self.vision = NavitSiglip(self, (counts or {}).get("vision", v.num_layers))
        self.resampler = Resampler(self)
        per_sample = view_patches(setup)
        self.views = len(per_sample) * self.batch
        self.length = max(per_sample) if per_sample else 0
        self.padded = len(set(per_sample)) > 1

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        inputs["position_ids"] = e.new(self.tokens, "int64", name="position_ids", category="inputs/batch")
        if self.views:
            patches = sum(view_patches(self.setup)) * self.batch
            inputs["pixel_values"] = e.new(patches * v.in_channels * v.patch_size ** 2, "fp32", name="pixel_values",
                                           category="inputs/batch")
            inputs["tgt_sizes"] = e.new(self.views * 2, "int32", name="tgt_sizes", category="inputs/batch")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        """get_vllm_embedding: the padded pixel batch (pad_sequence, permute + reshape: a copy, `.type(dtype)`), the
        vision tower in chunks, the resampler, then embed_tokens and the in-place scatter of the image tokens."""
        self._keep = ()
        if self.views:
            v = self.setup.model.vision
            numel = self.views * self.length * v.in_channels * v.patch_size ** 2
            e.scope = "vision"
            padded = e.new(numel, "fp32", name="pad_sequence")
            reshaped = ops._copy(e, padded, numel, "all_pixel_values.reshape")
            del padded
            pixels = ops.cast(e, reshaped, self.vision.patch.dtype, name="all_pixel_values.type")
            del reshaped
            mask = e.new(self.views * self.length, "bool", name="patch_attn_mask")
            chunks = []
            for start in range(0, self.views, VISION_BATCH_SIZE):
                count = min(VISION_BATCH_SIZE, self.views - start)
                part = pixels.view(numel * count // self.views)
                chunks.append(self.vision.run(self, e, part, count, self.length, self.padded))
                del part
            hidden = chunks[0] if len(chunks) == 1 else ops._copy(e, chunks[0], sum(c.numel for c in chunks), "cat")
            del chunks, pixels
            e.scope = "projector"
            features = self.resampler(e, hidden, self.views, self.length)
            del hidden, mask
            self._keep = (features,)
            del features
        e.scope = "language"
        x = self.embed_tokens(e)
        if self.views:
            # cur_vllm_emb.scatter_(0, image_indices.view(-1, 1).repeat(1, hidden), features): in place, with an
            # int64 index of (image tokens, hidden)
            index = e.new(self.views * self.resampler.queries * self.setup.model.text.hidden_size, "int64",
                          name="image_indices.repeat")
            del index
        return x

    def language(self, e: Engine, x: T) -> T:
        out = super().language(e, x)
        self._keep = ()  # get_vllm_embedding's vision_hidden_states go when MiniCPMV.forward returns
        return out


MODELS = {"minicpmv": MiniCPMVModel}
