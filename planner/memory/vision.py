"""Vision towers and projectors, re-executed on symbolic tensors (see sim.py and blocks.py)."""

from __future__ import annotations

from ..modules import PROJECTOR, VISION
from ..setup import TrainSetup
from . import ops
from .blocks import Params, apply_linear
from .sim import Engine, T


class QwenVisionBlock:
    """Qwen2VLVisionBlock (LayerNorm, QuickGELU fc1/fc2) and Qwen2_5_VLVisionBlock (RMSNorm, gated SiLU MLP):
    x + attn(norm1(x)); x + mlp(norm2(x)). VisionAttention: qkv -> unbind -> rotary in fp32 (q.float(), k.float(),
    cast back) -> attention per image (or per window) -> cat -> proj (models/qwen2_vl/modeling_qwen2_vl.py)."""

    def __init__(self, p: Params, index: int, full_attention: bool) -> None:
        v = p.setup.model.vision
        self.v, self.full_attention = v, full_attention
        prefix = f"vision.blocks.{index}"
        d = v.hidden_size
        self.norm_kind = v.norm
        if v.norm == "layernorm":
            self.norm1 = (p.vector(VISION, f"{prefix}.norm1.weight", d), p.vector(VISION, f"{prefix}.norm1.bias", d))
            self.norm2 = (p.vector(VISION, f"{prefix}.norm2.weight", d), p.vector(VISION, f"{prefix}.norm2.bias", d))
        else:
            self.norm1 = (p.vector(VISION, f"{prefix}.norm1.weight", d),)
            self.norm2 = (p.vector(VISION, f"{prefix}.norm2.weight", d),)
        self.qkv = p.linear(VISION, f"{prefix}.qkv", d, 3 * d, True)
        self.proj = p.linear(VISION, f"{prefix}.proj", d, d, True)
        if v.mlp == "gated_silu":
            self.gate = p.linear(VISION, f"{prefix}.gate_proj", d, v.intermediate_size, True)
            self.up = p.linear(VISION, f"{prefix}.up_proj", d, v.intermediate_size, True)
            self.down = p.linear(VISION, f"{prefix}.down_proj", v.intermediate_size, d, True)
        else:
            self.fc1 = p.linear(VISION, f"{prefix}.fc1", d, v.intermediate_size, True)
            self.fc2 = p.linear(VISION, f"{prefix}.fc2", v.intermediate_size, d, True)
        self.params = [q for group in (self.norm1, self.norm2) for q in group] + [
            q for lp in self._linears() for q in lp.tensors]

    def _linears(self):
        if self.v.mlp == "gated_silu":
            return (self.qkv, self.proj, self.gate, self.up, self.down)
        return (self.qkv, self.proj, self.fc1, self.fc2)

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)

    def _norm(self, e: Engine, x: T, params, tokens: int, name: str) -> T:
        if self.norm_kind == "layernorm":
            return ops.layer_norm(e, x, params[0], params[1], tokens, name=name)
        return ops.rms_norm(e, x, params[0], tokens, name=name)

    def __call__(self, e: Engine, x: T, ctx) -> T:
        v = self.v
        tokens, d = ctx.tokens, v.hidden_size
        h = self._norm(e, x, self.norm1, tokens, "norm1")
        qkv = apply_linear(e, h, self.qkv, "qkv")
        q, k = vision_rope(e, qkv.view(tokens * d), qkv.view(tokens * d), ctx)
        value = qkv.view(tokens * d, name="v")  # a view of the qkv output: saving it keeps qkv alive
        del qkv
        segments = ctx.segments if self.full_attention else ctx.window_segments
        attn = ctx.attention_segments(e, q, k, value, v.num_heads, segments, "attn")
        del q, k, value
        o = apply_linear(e, attn, self.proj, "proj")
        del attn, h  # the normed input is the attention's argument until it returns
        x = ops.add(e, x, o, name="attn_residual")
        del o
        h = self._norm(e, x, self.norm2, tokens, "norm2")
        if v.mlp == "gated_silu":
            gate = apply_linear(e, h, self.gate, "gate_proj")
            act = ops.unary(e, "silu", gate, name="act")
            del gate
            up = apply_linear(e, h, self.up, "up_proj")
            del h
            prod = ops.mul(e, act, up, name="act*up")
            del act, up
            mlp = apply_linear(e, prod, self.down, "down_proj")
            del prod
        else:
            fc1 = apply_linear(e, h, self.fc1, "fc1")
            del h
            act = ops.unary(e, v.mlp, fc1, name="act")
            del fc1
            mlp = apply_linear(e, act, self.fc2, "fc2")
            del act
        return ops.add(e, x, mlp, name="mlp_residual")


def vision_rope(e: Engine, q: T, k: T, ctx) -> tuple[T, T]:
    """apply_rotary_pos_emb_vision(q, k, cos, sin) of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (q and k are views of the
    qkv output): q.float() and k.float() (both alive until it returns), q*cos + rotate_half(q)*sin and the same for
    k in fp32, then each cast back to the input dtype."""
    q32 = ops.cast(e, q, "fp32", name="rope.q_fp32")
    k32 = ops.cast(e, k, "fp32", name="rope.k_fp32")
    q_embed = ops.rope(e, q32, ctx.cos, ctx.sin, name="rope.q")
    k_embed = ops.rope(e, k32, ctx.cos, ctx.sin, name="rope.k")
    q_out = ops.cast(e, q_embed, q.dtype, name="rope.q_cast")
    del q_embed
    k_out = ops.cast(e, k_embed, k.dtype, name="rope.k_cast")
    del k_embed, q32, k32
    return q_out, k_out


class QwenMerger:
    """PatchMerger / Qwen2_5_VLPatchMerger: ln_q over the vision width, view to (tokens/4, 4*d), Linear, GELU,
    Linear (models/qwen2_vl/modeling_qwen2_vl.py)."""

    def __init__(self, p: Params) -> None:
        spec = p.setup.model
        d = spec.vision.hidden_size
        self.norm_kind = spec.projector.norm
        self.ln = (p.vector(PROJECTOR, "merger.ln_q.weight", d),) + (
            (p.vector(PROJECTOR, "merger.ln_q.bias", d),) if self.norm_kind == "layernorm" else ())
        merged = spec.projector.in_features
        self.fc1 = p.linear(PROJECTOR, "merger.mlp.0", merged, merged, True)
        self.fc2 = p.linear(PROJECTOR, "merger.mlp.2", merged, spec.projector.out_features, True)

    def __call__(self, e: Engine, x: T, tokens: int) -> T:
        if self.norm_kind == "layernorm":
            h = ops.layer_norm(e, x, self.ln[0], self.ln[1], tokens, name="merger.ln_q")
        else:
            h = ops.rms_norm(e, x, self.ln[0], tokens, name="merger.ln_q")
        a = apply_linear(e, h, self.fc1, "merger.mlp.0")
        del h
        g = ops.unary(e, "gelu", a, name="merger.gelu")
        del a
        return apply_linear(e, g, self.fc2, "merger.mlp.2")


class VisionContext:
    """What the layers of a ViT run on one batch share: the token count and the attention callable
    (`attention(e, q, k, v, heads, tokens, name)` for `batched_attention`)."""

    def __init__(self, tokens: int, attention) -> None:
        self.tokens, self.attention = tokens, attention


def batched_attention(setup: TrainSetup, length: int):
    """Bidirectional attention of a ViT over a batch of sequences of `length` tokens (views or tiles as the batch
    dimension), one kernel call, no mask: sdpa -> the CUDA fused kernel (emulate.py CudaAttention), eager (or fp32
    without autocast) -> CLIP's / SigLIP's eager_attention_forward."""

    def attention(e: Engine, q: T, k: T, v: T, heads: int, tokens: int, name: str) -> T:
        if e.autocast:
            q, k, v = (ops.cast(e, t, e.autocast) for t in (q, k, v))
        if setup.attn == "eager" or q.dtype == "fp32":
            return ops.eager_attention(e, q, k, v, heads, heads, length, length, tokens // length, None, name=name)
        return ops.fused_attention(e, q, k, v, heads, tokens, name=name, seq=length)

    return attention


class EncoderLayerParams:
    """The parameters of CLIPEncoderLayer and SiglipEncoderLayer (models/clip/modeling_clip.py; modeling_siglip.py
    and Idefics3EncoderLayer copy it): layer_norm1, self_attn q/k/v_proj and out_proj, layer_norm2, mlp fc1 and fc2,
    all with bias. Subclasses give the forward."""

    def __init__(self, p: Params, index: int) -> None:
        v = p.setup.model.vision
        self.v = v
        d, prefix = v.hidden_size, f"vision.layers.{index}"
        self.ln1 = (p.vector(VISION, f"{prefix}.layer_norm1.weight", d),
                    p.vector(VISION, f"{prefix}.layer_norm1.bias", d))
        self.ln2 = (p.vector(VISION, f"{prefix}.layer_norm2.weight", d),
                    p.vector(VISION, f"{prefix}.layer_norm2.bias", d))
        self.q = p.linear(VISION, f"{prefix}.q_proj", d, d, True)
        self.k = p.linear(VISION, f"{prefix}.k_proj", d, d, True)
        self.v_proj = p.linear(VISION, f"{prefix}.v_proj", d, d, True)
        self.o = p.linear(VISION, f"{prefix}.out_proj", d, d, True)
        self.fc1 = p.linear(VISION, f"{prefix}.fc1", d, v.intermediate_size, True)
        self.fc2 = p.linear(VISION, f"{prefix}.fc2", v.intermediate_size, d, True)
        self.params = [*self.ln1, *self.ln2] + [
            q for lp in (self.q, self.k, self.v_proj, self.o, self.fc1, self.fc2)
            for q in lp.tensors]

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)


class ClipLayer(EncoderLayerParams):
    """CLIPEncoderLayer: layer_norm1 -> q/k/v_proj -> attention -> out_proj -> residual -> layer_norm2 -> fc1 ->
    QuickGELU -> fc2 -> residual (models/clip/modeling_clip.py)."""

    def __call__(self, e: Engine, x: T, ctx: VisionContext) -> T:
        v = self.v
        residual = x
        h = ops.layer_norm(e, x, self.ln1[0], self.ln1[1], ctx.tokens, name="layer_norm1")
        q = apply_linear(e, h, self.q, "q_proj")
        k = apply_linear(e, h, self.k, "k_proj")
        value = apply_linear(e, h, self.v_proj, "v_proj")
        del h
        attn = ctx.attention(e, q, k, value, v.num_heads, ctx.tokens, "self_attn")
        del q, k, value
        o = apply_linear(e, attn, self.o, "out_proj")
        del attn
        x = ops.add(e, residual, o, name="attn_residual")
        del residual, o
        residual = x
        h = ops.layer_norm(e, x, self.ln2[0], self.ln2[1], ctx.tokens, name="layer_norm2")
        del x
        f = apply_linear(e, h, self.fc1, "fc1")
        del h
        a = ops.unary(e, v.mlp, f, name="act")
        del f
        m = apply_linear(e, a, self.fc2, "fc2")
        del a
        return ops.add(e, residual, m, name="mlp_residual")


class LlavaProjector:
    """LlavaMultiModalProjector: linear_1 -> GELU -> linear_2 (models/llava/modeling_llava.py)."""

    def __init__(self, p: Params) -> None:
        proj = p.setup.model.projector
        self.l1 = p.linear(PROJECTOR, "multi_modal_projector.linear_1", proj.in_features, proj.out_features,
                           proj.bias)
        self.l2 = p.linear(PROJECTOR, "multi_modal_projector.linear_2", proj.out_features, proj.out_features,
                           proj.bias)

    def __call__(self, e: Engine, x: T) -> T:
        a = apply_linear(e, x, self.l1, "linear_1")
        g = ops.unary(e, "gelu", a, name="gelu")
        del a
        return apply_linear(e, g, self.l2, "linear_2")
