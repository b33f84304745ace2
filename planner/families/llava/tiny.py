"""The tiny LLaVA-1.5 model (`vlplan tiny-model --family llava`): its special tokens, chat template, tokenizer and
processor classes; runner/tiny.py builds it from these (imports transformers lazily).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vlplan.planner.spec import ModelSpec

# Tiny family -> the registry spec it shrinks
TINY_MODELS = {"llava": "llava-1.5-7b"}
IMAGE_TOKEN = "<image>"
TINY_IMAGE_SIZE = 112  # 8x8 patches of 14 px: 64 image tokens

# LLaVA-1.5 (Llama tokenizer): <unk> <s> </s> first, <image> and <pad> appended (llava-hf: 32000, 32001)
LEADING_TOKENS = ("<unk>", "<s>", "</s>")
TRAILING_TOKENS = ("<image>", "<pad>")

BOS_TOKEN = "<s>"  # Llama tokenizers prepend <s> (add_bos_token)

# llava-hf/llava-1.5-7b-hf's chat_template.json, extended to string contents (LLaMA-Factory's inline <image>)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)



def shrink(spec: ModelSpec, text, vision) -> tuple:
    """The tiny CLIP tower (112 px), projector and fixed-view processor around the shrunk widths."""
    vision = replace(vision, image_size=TINY_IMAGE_SIZE)
    projector = replace(spec.projector, in_features=vision.hidden_size, hidden_features=text.hidden_size,
                        out_features=text.hidden_size)
    side = TINY_IMAGE_SIZE // vision.patch_size
    processor = replace(spec.processor, image_size=TINY_IMAGE_SIZE, tokens_per_view=side * side)
    return vision, projector, processor


def make_tokenizer(raw):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                             pad_token="<pad>", model_max_length=4096)


def make_processor(name: str, spec: ModelSpec, tokenizer):
    """LlavaProcessor with the PIL CLIP image processor (no torchvision needed)."""
    import transformers

    from vlplan.runner.processor import assemble_processor

    p = spec.processor
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size, "width": p.image_size})
    # llava-hf processor_config.json: patch 14, "default" strategy (CLS dropped), one additional token (CLS)
    return assemble_processor(transformers.LlavaProcessor, tokenizer, image_processor, CHAT_TEMPLATE,
                              patch_size=spec.vision.patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)


def write_extra_files(spec: ModelSpec, out: Path) -> None:
    """LLaVA needs no file beyond the common ones."""
