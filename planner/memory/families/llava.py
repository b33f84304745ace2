"""LLaVA-1.5 and LLaVA-style models with a CLIP vision tower (transformers models/llava)."""

from __future__ import annotations

from ...modules import VISION
from ...setup import TrainSetup
from .. import ops
from ..model import BaseModel, segment_attention
from ..sim import Engine, Node, T
from ..vision import ClipLayer, LlavaProjector
from .qwen_vl import VisionContext


class LlavaModel(BaseModel):
    """LlavaForConditionalGeneration with a CLIP vision tower (vision_feature_layer -2, strategy "default")."""

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        v = setup.model.vision
        layers = (counts or {}).get("vision", v.num_layers)
        full = self.p.full(VISION)
        dt = self.p._dtype(full)
        d = v.hidden_size
        self.patch = e.param("vision.patch_embedding", v.in_channels * v.patch_size ** 2 * d, dt, full, VISION)
        self.cls = e.param("vision.class_embedding", d, dt, full, VISION)
        positions = (v.image_size // v.patch_size) ** 2 + 1
        self.pos = e.param("vision.position_embedding", positions * d, dt, full, VISION)
        self.pre_ln = (self.p.vector(VISION, "vision.pre_layrnorm.weight", d),
                       self.p.vector(VISION, "vision.pre_layrnorm.bias", d))
        self.post_ln = (self.p.vector(VISION, "vision.post_layernorm.weight", d),
                        self.p.vector(VISION, "vision.post_layernorm.bias", d))
        self.vision_layers = [ClipLayer(self.p, i) for i in range(layers)]
        self.projector = LlavaProjector(self.p)
        self.n_images = len(setup.images) * self.batch

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        if self.n_images:
            inputs["pixel_values"] = e.new(self.n_images * v.in_channels * v.image_size ** 2, "fp32",
                                           name="pixel_values", category="inputs/batch")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        x = self.embed_tokens(e)
        if not self.n_images:
            return x
        e.scope = "vision"
        v = self.setup.model.vision
        d = v.hidden_size
        grid = (v.image_size // v.patch_size) ** 2
        tokens = self.n_images * (grid + 1)
        # CLIPVisionEmbeddings: conv on pixel_values.to(conv dtype), flatten, cat with class embedding, + positions
        pixels = ops.cast(e, inputs["pixel_values"], self.patch.dtype, name="pixel_values:cast")
        patches = e.new(self.n_images * grid * d, e.autocast or self.patch.dtype, name="patch_embeds")
        saved = [ops.input_for_matmul(e, pixels)] if self.patch.trainable else []
        e.record(Node("conv2d", [], saved, [self.patch] if self.patch.trainable else []), patches)
        del pixels, saved
        cat = e.new(tokens * d, ops.promote(patches.dtype, self.cls.dtype), name="embeddings.cat")
        e.record(Node("cat", [patches] if patches.rg else [], [], [self.cls] if self.cls.trainable else []), cat)
        del patches
        pos = e.new(tokens * d, self.pos.dtype, name="position_embedding")  # embedding lookup
        e.record(Node("embedding", [], [], [self.pos] if self.pos.trainable else []), pos)
        emb = ops.add(e, cat, pos, name="embeddings")
        del cat, pos
        hidden = ops.layer_norm(e, emb, self.pre_ln[0], self.pre_ln[1], tokens, name="pre_layrnorm")
        del emb
        ctx = VisionContext(tokens, [], v, self.n_images, segment_attention(self.setup))
        ctx.segments = [grid + 1] * self.n_images
        selected = None
        for index, layer in enumerate(self.vision_layers):
            hidden = self._run_layer(e, layer, hidden, ctx)
            if index == len(self.vision_layers) - 2:
                selected = hidden  # hidden_states[-2]: captured by the output-capturing hook
        # CLIPVisionModel: post_layernorm on the CLS token of the last hidden state (pooler_output)
        cls = e.new(self.n_images * d, hidden.dtype, name="pooled")
        pooled = ops.layer_norm(e, cls, self.post_ln[0], self.post_ln[1], self.n_images, name="post_layernorm")
        del cls
        features = selected.view(self.n_images * grid * d, name="selected[:, 1:]")  # a slice: a view
        e.scope = "projector"
        image_features = self.projector(e, features)
        del features
        cat = e.new(image_features.numel, image_features.dtype, name="image_features.cat")
        e.record(Node("cat", [image_features] if image_features.rg else [], [], []), cat)
        cast = ops.cast(e, cat, x.dtype, name="image_features:cast")
        e.scope = "language"
        mask = e.new(self.tokens, "bool", name="image_mask")
        out = e.new(x.numel, x.dtype, name="inputs_embeds:scatter")
        inputs_ = [t for t in (x, cast) if t.rg]
        e.record(Node("masked_scatter", inputs_, [mask] if inputs_ else [], []), out)
        self._keep = (hidden, pooled, image_features, cat, cast)
        del mask
        return out

    def language(self, e: Engine, x: T) -> T:
        out = super().language(e, x)
        self._keep = None
        return out



MODELS = {"llava": LlavaModel}
