"""What the two Gemma-based families share around their language models (transformers models/paligemma with
models/gemma2, and models/gemma3): LLaMA-Factory's batch with `token_type_ids` and the scaled word embedding.
Gemma's RMSNorm is `ops.gemma_rms_norm`.
"""

from __future__ import annotations

from . import ops
from .sim import Engine, Node, T


class GemmaInputs:
    """A mixin placed before BaseModel for PaliGemma (Gemma 2) and Gemma 3: `self.views` counts the vision tower's
    views in the batch and `self.embed_scale` is the embedding's 0-d scale buffer."""

    def inputs(self, e: Engine) -> dict[str, T]:
        """input_ids and labels, token_type_ids (1 or 0 on the image tokens; every batch carries them) and, with
        images, pixel_values of (views, channels, size, size) in fp32."""
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        inputs["token_type_ids"] = e.new(self.tokens, "int64", name="token_type_ids", category="inputs/batch")
        if self.views:
            inputs["pixel_values"] = e.new(self.views * v.in_channels * v.image_size ** 2, "fp32",
                                           name="pixel_values", category="inputs/batch")
        return inputs

    def embedding(self, e: Engine) -> T:
        """Gemma2TextScaledWordEmbedding / Gemma3TextScaledWordEmbedding (the same code): embedding(ids) *
        embed_scale.to(weight dtype)."""
        raw = super().embedding(e)
        scale = ops.cast(e, self.embed_scale.tensor, self.embed.dtype, name="embed_scale")
        out = e.new(raw.numel, raw.dtype, name="inputs_embeds_scaled")
        e.record(Node("mul", [raw] if raw.rg else [], [scale] if raw.rg else [], []), out)
        del raw, scale
        return out
