"""The tiny Qwen2-VL / Qwen2.5-VL model (`vlplan tiny-model --family qwen2-vl|qwen2.5-vl`): its special tokens,
chat template, tokenizer and processor classes; runner/tiny.py builds it from these (imports transformers lazily).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from vlplan.planner.spec import ModelSpec

# Tiny family -> the registry spec it shrinks
TINY_MODELS = {"qwen2.5-vl": "qwen2.5-vl-3b", "qwen2-vl": "qwen2-vl-2b"}
IMAGE_TOKEN = "<|image_pad|>"

# Qwen2-VL's special tokens, in the order of the checkpoints' added_tokens (151643 <|endoftext|> ... 151656
# <|video_pad|>): the config derives vision_start/end (image - 3, image - 2) and video (image + 1) from the image id.
TRAILING_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
LEADING_TOKENS: tuple[str, ...] = ()
BOS_TOKEN = None  # Qwen tokenizers prepend nothing

# Qwen2-VL-2B-Instruct's chat_template.json (Qwen2.5-VL's is the same)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def shrink(spec: ModelSpec, text, vision) -> tuple:
    """The tiny vision tower, projector and processor around the shrunk text and vision widths."""
    vision = replace(vision, fullatt_block_indexes=(vision.num_layers - 1,) if spec.vision.fullatt_block_indexes
                     else ())
    merged = vision.hidden_size * vision.spatial_merge_size**2
    projector = replace(spec.projector, in_features=merged, hidden_features=merged, out_features=text.hidden_size)
    return vision, projector, spec.processor


def make_tokenizer(raw):
    import transformers

    return transformers.Qwen2Tokenizer(tokenizer_object=raw, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", model_max_length=32768)


def make_processor(name: str, spec: ModelSpec, tokenizer):
    """Qwen2VLProcessor / Qwen2_5_VLProcessor with the PIL image processor (no torchvision needed)."""
    import transformers

    from vlplan.runner.processor import assemble_processor

    p = spec.processor
    image_processor = transformers.Qwen2VLImageProcessorPil(
        min_pixels=p.min_pixels, max_pixels=p.max_pixels, patch_size=p.patch_size, merge_size=p.merge_size,
        temporal_patch_size=spec.vision.temporal_patch_size)
    cls = transformers.Qwen2_5_VLProcessor if name == "qwen2.5-vl" else transformers.Qwen2VLProcessor
    return assemble_processor(cls, tokenizer, image_processor, CHAT_TEMPLATE)


def write_extra_files(spec: ModelSpec, out: Path) -> None:
    """What a torchvision install builds the (unused) video processor from."""
    p = spec.processor
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": p.patch_size, "merge_size": p.merge_size,
         "temporal_patch_size": spec.vision.temporal_patch_size}, indent=2) + "\n")
