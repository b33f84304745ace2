"""Phi-3.5-vision (remote code, no transformers class): an analytic model of its training step, NOT trace-validated
(the tracer needs an installed model class). It mirrors the hub repo's modeling_phi3_v.py (Phi3VModel, Phi3
decoder layers) and image_embedding_phi3_v.py (Phi3ImageEmbedding) as read from public copies, with the same
symbolic ops as the trace-validated families.

- Vision: CLIP ViT-L/14-336 on every crop slot of every image, padding slots included (`pixel_values.flatten(0, 1)`:
  images x (num_crops + 1) views of 577 tokens), called with `output_hidden_states=True`: all 25 hidden states stay
  alive until the features (layer -2 without the class token, a view) are taken. The transformers CLIP module picks
  SDPA (the fused kernel), FlashAttention-2 under fa2.
- HD transform per image: 2x2 merge of the 24x24 patches to 12x12 x 4096 (reshape/permute copies), a learnable
  sub_GN separator after every row, glb_GN between sub-crops and the global view, one cat, `.to(projection dtype)`,
  then img_projection (Linear, GELU, Linear); `index_put` writes the features into the token embeddings (a copy).
- Language model: Phi-3 layers (fused qkv_proj and gate_up_proj, RoPE computed in every layer). The remote classes
  have no SDPA path, so the text attention is eager (matmul, + the (batch, 1, seq, seq) causal mask, fp32 softmax,
  matmul) unless FlashAttention-2 is asked for.

Mirrors the remote code of microsoft/Phi-3.5-vision-instruct (modeling_phi3_v.py, image_embedding_phi3_v.py).
"""

from __future__ import annotations

from ...memory import ops
from ...memory.blocks import Params, apply_linear
from ...memory.model import BaseModel, ConditionalGenerationStep
from ...memory.siglip import SiglipLayer
from ...memory.sim import Engine, Node, T
from ...memory.vision import VisionContext, batched_attention
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...setup import TrainSetup


class ClipTower:
    """CLIPVisionModel (vision_model: embeddings, pre_layrnorm, encoder, post_layernorm) as Phi3ImageEmbedding
    builds it from CLIP_VIT_LARGE_PATCH14_336_CONFIG."""

    def __init__(self, model: BaseModel, layers: int) -> None:
        p, e = model.p, model.e
        v = p.setup.model.vision
        self.v = v
        full = p.full(VISION)
        dt = p._dtype(full)
        d = v.hidden_size
        self.positions = (v.image_size // v.patch_size) ** 2 + 1
        self.patch = e.param("vision.patch_embedding", v.in_channels * v.patch_size ** 2 * d, dt, full, VISION,
                             shape=(d, v.in_channels, v.patch_size, v.patch_size))
        self.cls = e.param("vision.class_embedding", d, dt, full, VISION)
        self.pos = e.param("vision.position_embedding", self.positions * d, dt, full, VISION,
                           shape=(self.positions, d))
        self.position_ids = e.param("vision.position_ids", self.positions, "int64", False, VISION)  # a buffer
        self.pre_ln = (p.vector(VISION, "vision.pre_layrnorm.weight", d), p.vector(VISION, "vision.pre_layrnorm.bias", d))
        self.post_ln = (p.vector(VISION, "vision.post_layernorm.weight", d),
                        p.vector(VISION, "vision.post_layernorm.bias", d))
        self.layers = [SiglipLayer(p, i) for i in range(layers)]  # CLIPEncoderLayer: the same modules

    def features(self, model: BaseModel, e: Engine, pixel_values: T, views: int) -> T:
        """get_img_features: the output of the second-to-last layer (hidden_states[-2]); every hidden state lives
        until the CLIP output is dropped."""
        v = self.v
        d, grid = v.hidden_size, (v.image_size // v.patch_size) ** 2
        tokens = views * self.positions
        pixels = ops.cast(e, pixel_values, self.patch.dtype, name="pixel_values:cast")
        patches = ops.conv2d(e, pixels, self.patch, None, views * grid * d, name="patch_embeds")
        del pixels
        cat = e.new(tokens * d, ops.promote(patches.dtype, self.cls.dtype), name="embeddings.cat")
        e.record(Node("cat", [patches] if patches.rg else [], [], [self.cls] if self.cls.trainable else []), cat)
        del patches
        pos = e.new(self.positions * d, self.pos.dtype, name="position_embedding")
        e.record(Node("embedding", [], [], [self.pos] if self.pos.trainable else []), pos)
        emb = ops.add(e, cat, pos, name="embeddings")
        del cat, pos
        hidden = ops.layer_norm(e, emb, *self.pre_ln, tokens, name="pre_layrnorm")
        del emb
        states = [hidden]
        ctx = VisionContext(tokens, batched_attention(model.setup, self.positions))
        for layer in self.layers:
            hidden = model._run_layer(e, layer, hidden, ctx)
            states.append(hidden)
        cls = e.new(views * d, hidden.dtype, name="pooled")
        pooled = ops.layer_norm(e, cls, *self.post_ln, views, name="post_layernorm")
        del cls, pooled, hidden, ctx
        chosen = states[-2] if len(states) > 1 else states[-1]
        del states  # CLIPVisionModel's output goes; the chosen state stays behind the `[:, 1:]` view
        return chosen


class Phi3Layer:
    """Phi3DecoderLayer: input_layernorm -> self_attn (qkv_proj, RoPE of this layer, attention, o_proj) ->
    residual -> post_attention_layernorm -> mlp (gate_up_proj, chunk, up * silu(gate), down_proj) -> residual."""

    def __init__(self, p: Params, index: int, trainable: bool = True) -> None:
        t = p.setup.model.text
        self.t = t
        prefix = f"language.layers.{index}"
        h, q_out, kv_out = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        self.norm1 = p.vector(LANGUAGE, f"{prefix}.input_layernorm", h, trainable)
        self.norm2 = p.vector(LANGUAGE, f"{prefix}.post_attention_layernorm", h, trainable)
        self.qkv = p.linear(LANGUAGE, f"{prefix}.qkv_proj", h, q_out + 2 * kv_out, False, trainable)
        self.o = p.linear(LANGUAGE, f"{prefix}.o_proj", q_out, h, False, trainable)
        self.gate_up = p.linear(LANGUAGE, f"{prefix}.gate_up_proj", h, 2 * t.intermediate_size, False, trainable)
        self.down = p.linear(LANGUAGE, f"{prefix}.down_proj", t.intermediate_size, h, False, trainable)
        self.params = [self.norm1, self.norm2] + [
            q for lp in (self.qkv, self.o, self.gate_up, self.down)
            for q in lp.tensors]

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)

    def __call__(self, e: Engine, x: T, ctx) -> T:
        t, tokens = self.t, ctx.tokens
        residual = x
        h = ops.rms_norm(e, x, self.norm1, tokens, name="input_layernorm")
        qkv = apply_linear(e, h, self.qkv, "qkv_proj")
        q_numel, kv_numel = tokens * t.num_heads * t.head_dim, tokens * t.num_kv_heads * t.head_dim
        q, k, value = qkv.view(q_numel, "q"), qkv.view(kv_numel, "k"), qkv.view(kv_numel, "v")
        # Phi3(LongRoPE)RotaryEmbedding in every layer: cos/sin of (1, seq, head_dim) in the hidden dtype
        cos = e.new(ctx.seq * t.head_dim, qkv.dtype, name="cos")
        sin = e.new(ctx.seq * t.head_dim, qkv.dtype, name="sin")
        q_rot = ops.rope(e, q, cos, sin, name="q_rope")
        k_rot = ops.rope(e, k, cos, sin, name="k_rope")
        del q, k, cos, sin
        if ctx.fused:
            attn = ops.fused_attention(e, ops.cast(e, q_rot, e.autocast) if e.autocast else q_rot,
                                       ops.cast(e, k_rot, e.autocast) if e.autocast else k_rot,
                                       ops.cast(e, value, e.autocast) if e.autocast else value,
                                       t.num_heads, tokens, name="self_attn")
        else:
            # matmul(attn_weights, value_states) on a strided slice of qkv: a contiguous copy for the bmm
            v_contiguous = ops._copy(e, value, value.numel, "v.contiguous")
            attn = ops.eager_attention(e, q_rot, k_rot, v_contiguous, t.num_heads, t.num_kv_heads, ctx.seq,
                                       ctx.seq, tokens // ctx.seq, ctx.mask, name="self_attn")
            del v_contiguous
        o = apply_linear(e, attn, self.o, "o_proj")
        del q_rot, k_rot, value, qkv, attn, h
        x = ops.add(e, residual, o, name="attn_residual")
        del residual, o
        residual = x
        h = ops.rms_norm(e, x, self.norm2, tokens, name="post_attention_layernorm")
        del x
        gate_up = apply_linear(e, h, self.gate_up, "gate_up_proj")
        gate = gate_up.view(gate_up.numel // 2, "gate")
        up = gate_up.view(gate_up.numel // 2, "up")
        act = ops.unary(e, "silu", gate, name="act")
        prod = ops.mul(e, up, act, name="up*act")
        del gate, up, act, gate_up
        down = apply_linear(e, prod, self.down, "down_proj")
        del prod, h
        return ops.add(e, residual, down, name="mlp_residual")


class _TextCtx:
    def __init__(self, tokens: int, seq: int, mask: T | None, fused: bool) -> None:
        self.tokens, self.seq, self.mask, self.fused = tokens, seq, mask, fused


class Phi3VModel(ConditionalGenerationStep, BaseModel):
    """Phi3VForCausalLM (microsoft/Phi-3.5-vision-instruct). Analytic, not trace-validated (see the module
    docstring)."""

    # One more frozen vision layer adds its output too: the tower runs with output_hidden_states=True and every hidden
    # state stays alive (`ClipTower`); tests/test_speed_shortcuts.py shows the shortcut would be wrong here
    frozen_vision_layers_add_weights_only = False

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        spec = setup.model
        counts = counts or {"text": spec.text.num_layers, "vision": spec.vision.num_layers}
        super().__init__(e, setup, {"text": 0})  # embeddings, final norm, lm_head, RoPE buffers; layers below
        first_trainable = counts["text"] - setup.freeze_trainable_layers if setup.method == "freeze" else 0
        self.layers = [Phi3Layer(self.p, i, trainable=i >= first_trainable) for i in range(counts["text"])]
        self.clip = ClipTower(self, counts["vision"])
        proj = spec.projector
        full = self.p.full(PROJECTOR)
        # nn.Parameter(torch.zeros([1, 1, D])) and ([1, 1, 1, D])
        self.separators = [e.param(f"vision_embed_tokens.{n}", proj.in_features, self.p._dtype(full), full, PROJECTOR,
                                   shape=(1,) * ones + (proj.in_features,))
                           for n, ones in (("glb_GN", 2), ("sub_GN", 3))]
        self.proj1 = self.p.linear(PROJECTOR, "img_projection.0", proj.in_features, proj.out_features, True)
        self.proj2 = self.p.linear(PROJECTOR, "img_projection.2", proj.out_features, proj.out_features, True)
        self.images = setup.image_tokens()
        self.slots = spec.processor.max_tiles + 1  # num_crops + 1 views per image, padding included

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        if self.images:
            views = len(self.images) * self.batch * self.slots
            inputs["pixel_values"] = e.new(views * v.in_channels * v.image_size ** 2, "fp32", name="pixel_values",
                                           category="inputs/batch")
            inputs["image_sizes"] = e.new(len(self.images) * self.batch * 2, "int64", name="image_sizes",
                                          category="inputs/batch")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        """Phi3ImageEmbedding.forward: wte(input_ids), CLIP features, the HD transform and projection, index_put."""
        x = self.embed_tokens(e)
        if not self.images:
            return x
        e.scope = "vision"
        views = len(self.images) * self.batch * self.slots
        features = self.clip.features(self, e, inputs["pixel_values"], views)
        e.scope = "projector"
        merged = self._hd_transform(e, features)
        del features
        target = self.proj1.bias.dtype  # `.to(target_dtype)`, the projection's bias dtype
        merged_cast = ops.cast(e, merged, target, name="hd_features.to")
        del merged
        a = apply_linear(e, merged_cast, self.proj1, "img_projection.0")
        del merged_cast
        g = ops.unary(e, "gelu", a, name="img_projection.1")
        del a
        projected = apply_linear(e, g, self.proj2, "img_projection.2")
        del g
        e.scope = "language"
        out = e.new(x.numel, ops.promote(x.dtype, projected.dtype), name="index_put")
        e.record(Node("index_put", [t for t in (x, projected) if t.rg], [], []), out)
        del projected, x
        return out

    def _hd_transform(self, e: Engine, features: T) -> T:
        """hd_feature_transform (order sub_glb): per image, the 2x2-merged sub-crops and global view with row
        separators (copies), concatenated with glb_GN between them; all images concatenated."""
        v, p = self.setup.model.vision, self.setup.model.processor
        width = 4 * v.hidden_size
        merged_grid = (v.image_size // v.patch_size) // 2  # 12
        per_view = merged_grid * merged_grid * width
        global_hd = ops._copy(e, features, len(self.images) * self.batch * per_view, "global.2x2merge")
        global_rows = ops._copy(e, global_hd, len(self.images) * self.batch * merged_grid * (merged_grid + 1) * width,
                                "global.newline")
        del global_hd
        pieces = []
        for _ in range(self.batch):
            for image in self.images:
                rows, cols = image.resized_height // p.image_size, image.resized_width // p.image_size
                sub = ops._copy(e, features, rows * cols * per_view, "sub.2x2merge")
                pieces.append(ops._copy(e, sub, rows * merged_grid * (cols * merged_grid + 1) * width, "sub.newline"))
                del sub
        total = sum(t.numel for t in pieces) + len(pieces) * (width + merged_grid * (merged_grid + 1) * width)
        cat = e.new(total, features.dtype, name="hd_features.cat")
        e.record(Node("cat", [t for t in (*pieces, global_rows) if t.rg], [], []), cat)
        del pieces, global_rows
        return cat

    def language(self, e: Engine, x: T) -> T:
        """Phi3VModel.forward: position_ids (arange), the 4D causal mask for eager attention, the layers, the final
        norm."""
        fused = self.setup.attn == "fa2"
        ctx = _TextCtx(self.tokens, self.seq, None if fused else e.new(self.batch * self.seq * self.seq, x.dtype,
                                                                         name="causal_mask"), fused)
        ctx.position_ids = e.new(self.seq, "int64", name="position_ids")
        for layer in self.layers:
            x = self._run_layer(e, layer, x, ctx)
        out = ops.rms_norm(e, x, self.norm, self.tokens, name="norm")
        del x, ctx
        return out


MODELS = {"phi3_v": Phi3VModel}
