"""LLaVA-NeXT / LLaVA-1.6 (model_type `llava_next`): CLIP ViT-L/14-336, the LLaVA 2-layer projector, a learned
`image_newline` vector, and "anyres" tiling over `image_grid_pinpoints` (models/llava_next/modeling_llava_next.py).

Every image runs through CLIP as one 336x336 base view plus the tiles of the best pinpoint grid; the language model
sees the unpadded tile features with one image_newline per row, plus the 576 base-view tokens.
"""

from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec
from ..llava.specs import CLIP_VIT_L_336, _llava_text

# image_grid_pinpoints of both v1.6 7B checkpoints ((height, width) pairs)
LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
LLAVA_NEXT_PROCESSOR = ProcessorSpec(
    rule="llava_next_anyres", patch_size=14, image_size=336, tokens_per_view=576, pinpoints=LLAVA_V16_PINPOINTS,
)


def _llava_next(name, hf_id, url, text, *, aliases=(), unverified=""):
    return ModelSpec(
        name=name, family="llava_next", hf_id=hf_id, source_url=url, hf_class="LlavaNextForConditionalGeneration",
        vision=CLIP_VIT_L_336,
        projector=ProjectorSpec(arch="mlp2x_gelu", in_features=CLIP_VIT_L_336.hidden_size,
                                hidden_features=text.hidden_size, out_features=text.hidden_size),
        text=text, processor=LLAVA_NEXT_PROCESSOR, image_token_id=32000, dtype="float16", aliases=aliases,
        unverified=unverified,
    )


SPECS = [
    # https://huggingface.co/llava-hf/llava-v1.6-mistral-7b-hf/blob/main/config.json
    # text_config: Mistral-7B-Instruct-v0.2 (14336 inter, 8 kv heads, max_pos 32768, sliding_window null)
    _llava_next("llava-v1.6-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf",
                "https://huggingface.co/llava-hf/llava-v1.6-mistral-7b-hf/blob/main/config.json",
                _llava_text(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=32064, max_pos=32768,
                            arch="mistral"),
                aliases=("liuhaotian/llava-v1.6-mistral-7b",)),
    # https://huggingface.co/llava-hf/llava-v1.6-vicuna-7b-hf/blob/main/config.json
    _llava_next("llava-v1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf",
                "https://huggingface.co/llava-hf/llava-v1.6-vicuna-7b-hf/blob/main/config.json",
                _llava_text(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32064, max_pos=4096),
                aliases=("liuhaotian/llava-v1.6-vicuna-7b",)),
]
