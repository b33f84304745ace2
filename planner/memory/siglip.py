"""The SigLIP vision tower (transformers models/siglip/modeling_siglip.py), shared by the families that run one:
PaliGemma (SiglipVisionModel), Idefics3 / SmolVLM (Idefics3VisionTransformer, the same layers), MiniCPM-V (the
NaViT SigLIP `vpm`) and Gemma 3 (with its own layer forward and patch convolution, families/gemma3.py).
Phi-3.5-vision runs `SiglipLayer` as its CLIP layer (CLIPEncoderLayer is the same module set).
"""

from __future__ import annotations

from ..modules import VISION
from . import ops
from .blocks import apply_linear
from .model import BaseModel
from .sim import Engine, Node, T
from .vision import EncoderLayerParams, VisionContext, batched_attention


class SiglipLayer(EncoderLayerParams):
    """SiglipEncoderLayer (Idefics3EncoderLayer is a copy): layer_norm1 -> self_attn (q/k/v_proj, attention,
    out_proj) -> residual -> layer_norm2 -> mlp (fc1, gelu-tanh, fc2) -> residual. The normed input is the
    attention's argument until it returns, and the MLP's until the MLP returns; q, k and v are locals of
    SiglipAttention.forward until it returns. `ctx.attention` returns the attention output only."""

    def __call__(self, e: Engine, x: T, ctx) -> T:
        residual = x
        h = ops.layer_norm(e, x, self.ln1[0], self.ln1[1], ctx.tokens, name="layer_norm1")
        q = apply_linear(e, h, self.q, "q_proj")
        k = apply_linear(e, h, self.k, "k_proj")
        value = apply_linear(e, h, self.v_proj, "v_proj")
        attn = ctx.attention(e, q, k, value, self.v.num_heads, ctx.tokens, "self_attn")
        o = apply_linear(e, attn, self.o, "out_proj")
        del q, k, value, attn, h  # SiglipAttention.forward returns
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
        return ops.add(e, residual, m, name="mlp_residual")


class SiglipVision:
    """SiglipVisionModel without head (vision_use_head false): SiglipVisionEmbeddings (patch Conv2d on
    `pixel_values.to(weight dtype)`, + position_embedding(position_ids)), the encoder layers, post_layernorm.
    Subclasses choose the layer class and how the patch convolution is modeled."""

    position_ids_buffer = True  # SiglipVisionEmbeddings.position_ids (int64, one row of positions)
    layer = SiglipLayer

    def __init__(self, model: BaseModel, layers: int) -> None:
        p, e = model.p, model.e
        v = p.setup.model.vision
        full = p.full(VISION)
        dt = p._dtype(full)
        d = v.hidden_size
        self.v = v
        self.patch = e.param("vision.patch_embedding.weight", v.in_channels * v.patch_size ** 2 * d, dt, full, VISION,
                             shape=(d, v.in_channels, v.patch_size, v.patch_size))
        self.patch_bias = e.param("vision.patch_embedding.bias", d, dt, full, VISION)
        self.positions = (v.image_size // v.patch_size) ** 2
        self.pos = e.param("vision.position_embedding", self.positions * d, dt, full, VISION,
                           shape=(self.positions, d))
        if self.position_ids_buffer:
            self.position_ids = e.param("vision.position_ids", self.positions, "int64", False, VISION)
        self.layers = [self.layer(p, i) for i in range(layers)]
        self.post_ln = (p.vector(VISION, "vision.post_layernorm.weight", d),
                        p.vector(VISION, "vision.post_layernorm.bias", d))

    def patch_embeds(self, e: Engine, pixels: T, out_numel: int) -> T:
        """The patch Conv2d (padding="valid", with bias), as the tracer's CPU autocast runs it (`ops.conv2d`)."""
        return ops.conv2d(e, pixels, self.patch, self.patch_bias, out_numel, name="patch_embeds")

    def embeddings(self, e: Engine, pixel_values: T, images: int) -> T:
        v = self.v
        pixels = ops.cast(e, pixel_values, self.patch.dtype, name="pixel_values:cast")
        patches = self.patch_embeds(e, pixels, images * self.positions * v.hidden_size)
        patches = e.hook_input(patches)  # SiglipVisionModel.get_input_embeddings() is embeddings.patch_embedding
        del pixels
        pos = e.new(self.positions * v.hidden_size, self.pos.dtype, name="position_embedding")
        e.record(Node("embedding", [], [], [self.pos] if self.pos.trainable else []), pos)
        out = ops.add(e, patches, pos, name="embeddings")
        del patches, pos
        return out

    def __call__(self, model: BaseModel, e: Engine, pixel_values: T, images: int, attention=None) -> T:
        """The tower on `images` views of `self.positions` patches; `attention` defaults to `batched_attention`."""
        tokens = images * self.positions
        embedded = self.embeddings(e, pixel_values, images)
        ctx = VisionContext(tokens, attention or batched_attention(model.setup, self.positions))
        hidden = embedded
        for layer in self.layers:
            hidden = model._run_layer(e, layer, hidden, ctx)
        del ctx, embedded  # the encoder returns: its `inputs_embeds` argument goes
        return ops.layer_norm(e, hidden, self.post_ln[0], self.post_ln[1], tokens, name="post_layernorm")
