"""PaliGemma (2) fixed views: transformers models/siglip/image_processing_pil_siglip.py resizes every image to
`image_size` x `image_size`; SigLIP has no class token, so the encoder runs (image_size / 14)**2 patches and the LM
gets the same number of <image> tokens (`image_seq_length`, processing_paligemma.py). The generic "fixed" rule adds a
CLIP class token, hence this rule."""

from __future__ import annotations

from ...spec import ProcessorSpec


def _siglip_fixed(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int]:
    patches = (p.image_size // p.patch_size) ** 2
    return p.image_size, p.image_size, patches, p.tokens_per_view, 1


RULES = {"siglip_fixed": _siglip_fixed}
