"""Tiny random models of a family that transformers loads offline: smoke tests of a pipeline, and our tests.

A tiny model keeps everything that makes the family's training step what it is (the transformers class, the
image processor and its patch/merge sizes, the special tokens and the chat template) and shrinks only the widths
and depths. The config is derived from a registry spec (`dataclasses.replace` + `spec_to_hf_config`), so a tiny
model exercises the same code as the spec it shrinks; the tokenizer is a small byte-level BPE trained here on a
fixed corpus (deterministic), with the family's special tokens at the ids the config names.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import resolve
from vlplan.planner.spec import ModelSpec

# Every text width must be a multiple of 8; Qwen's M-RoPE sections (16, 24, 24) need head_dim 128.
TINY_VOCAB_SIZE = 1024
TINY_TEXT = dict(hidden_size=256, intermediate_size=512, num_heads=2, num_kv_heads=1, head_dim=128,
                 vocab_size=TINY_VOCAB_SIZE)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_heads=4)
TINY_LLAVA_IMAGE_SIZE = 112  # 8x8 patches of 14 px: 64 image tokens

# Qwen2-VL's special tokens, in the order of the checkpoints' added_tokens (151643 <|endoftext|> ... 151656
# <|video_pad|>): the config derives vision_start/end (image - 3, image - 2) and video (image + 1) from the image id.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# LLaVA-1.5 (Llama tokenizer): <unk> <s> </s> first, <image> and <pad> appended (llava-hf: 32000, 32001)
LLAVA_LEADING_TOKENS = ("<unk>", "<s>", "</s>")
LLAVA_TRAILING_TOKENS = ("<image>", "<pad>")

# Qwen2-VL-2B-Instruct's chat_template.json (Qwen2.5-VL's is the same)
QWEN_CHAT_TEMPLATE = (
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
# llava-hf/llava-1.5-7b-hf's chat_template.json, extended to string contents (LLaMA-Factory's inline <image>)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The text the BPE merges are learned from: the chat templates' words and everyday captioning English.
_CORPUS = """system user assistant USER ASSISTANT You are a helpful assistant.
What is in the image? What is shown in this picture? Describe the image. Describe the picture in detail.
The image shows a red square on a blue background. There is a green circle in the middle of a white image.
A photo of a cat sitting on a table next to a window. Two people are walking along the beach at sunset.
The color of the shape is red, green, blue, yellow, black or white. How many objects are there in the image?
There are three objects: a square, a circle and a triangle. Answer the question about the picture briefly.
Yes. No. The answer is one, two, three, four, five, six, seven, eight, nine or ten. left right top bottom
"""


# Tiny family -> the registry spec it shrinks
TINY_FAMILIES = {"qwen2.5-vl": "qwen2.5-vl-3b", "qwen2-vl": "qwen2-vl-2b", "llava": "llava-1.5-7b"}
# transformers model_type -> tiny family
FAMILY_OF_MODEL_TYPE = {"qwen2_5_vl": "qwen2.5-vl", "qwen2_vl": "qwen2-vl", "llava": "llava"}


def tiny_family_for(spec: ModelSpec) -> str:
    """The tiny family with the same model class, processor and vision tower as `spec` (`--smoke-test`)."""
    family = FAMILY_OF_MODEL_TYPE.get(spec.family)
    if family is None or spec.vision.arch != resolve(TINY_FAMILIES[family]).vision.arch:
        raise VlplanError(f"no tiny model for {spec.name} ({spec.family}, {spec.vision.arch} vision tower); tiny "
                          f"models exist for {', '.join(TINY_FAMILIES)}")
    return family


def image_token_of(family: str) -> str:
    return "<|image_pad|>" if family.startswith("qwen") else "<image>"


def _base_of(family: str) -> str:
    if family not in TINY_FAMILIES:
        raise VlplanError(f"--family {family!r} is not one of {', '.join(TINY_FAMILIES)}")
    return TINY_FAMILIES[family]


def train_tokenizer(family: str):
    """A byte-level BPE (Qwen's pre-tokenizer) with the family's special tokens; deterministic."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    qwen = family.startswith("qwen")
    leading = () if qwen else LLAVA_LEADING_TOKENS
    trailing = QWEN_SPECIAL_TOKENS if qwen else LLAVA_TRAILING_TOKENS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=TINY_VOCAB_SIZE - len(trailing) - 8, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(leading))
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in trailing])
    if not qwen:
        # Llama tokenizers prepend <s> (add_bos_token)
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                 special_tokens=[("<s>", bos)])
    return tokenizer


def tiny_spec(family: str, image_token_id: int, text_layers: int = 2, vision_layers: int = 2) -> ModelSpec:
    """The registry spec of `family`, shrunk; the image token at `image_token_id` of the tiny tokenizer."""
    spec = resolve(_base_of(family))
    text = replace(spec.text, num_layers=text_layers, **TINY_TEXT)
    vision = replace(spec.vision, num_layers=vision_layers, **TINY_VISION)
    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        vision = replace(vision, fullatt_block_indexes=(vision_layers - 1,) if spec.vision.fullatt_block_indexes
                         else ())
        merged = vision.hidden_size * vision.spatial_merge_size**2
        projector = replace(spec.projector, in_features=merged, hidden_features=merged,
                            out_features=text.hidden_size)
        processor = spec.processor
    else:
        vision = replace(vision, image_size=TINY_LLAVA_IMAGE_SIZE)
        projector = replace(spec.projector, in_features=vision.hidden_size, hidden_features=text.hidden_size,
                            out_features=text.hidden_size)
        side = TINY_LLAVA_IMAGE_SIZE // vision.patch_size
        processor = replace(spec.processor, image_size=TINY_LLAVA_IMAGE_SIZE, tokens_per_view=side * side)
    return replace(spec, name=f"tiny-{family}", hf_id=f"tiny-{family}", text=text, vision=vision,
                   projector=projector, processor=processor, image_token_id=image_token_id, aliases=())


def make_processor(family: str, spec: ModelSpec, tokenizer):
    """The family's transformers processor (PIL image processor backend: no torchvision needed)."""
    import transformers

    from .processor import assemble_processor

    p = spec.processor
    if family.startswith("qwen"):
        image_processor = transformers.Qwen2VLImageProcessorPil(
            min_pixels=p.min_pixels, max_pixels=p.max_pixels, patch_size=p.patch_size, merge_size=p.merge_size,
            temporal_patch_size=spec.vision.temporal_patch_size)
        cls = transformers.Qwen2_5_VLProcessor if family == "qwen2.5-vl" else transformers.Qwen2VLProcessor
        return assemble_processor(cls, tokenizer, image_processor, QWEN_CHAT_TEMPLATE)
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size, "width": p.image_size})
    # llava-hf processor_config.json: patch 14, "default" strategy (CLS dropped), one additional token (CLS)
    return assemble_processor(transformers.LlavaProcessor, tokenizer, image_processor, LLAVA_CHAT_TEMPLATE,
                              patch_size=spec.vision.patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)


def make_tokenizer(family: str):
    """The transformers tokenizer around `train_tokenizer` (Qwen2Tokenizer for Qwen, the generic backend else)."""
    import transformers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    raw = train_tokenizer(family)
    if family.startswith("qwen"):
        return transformers.Qwen2Tokenizer(tokenizer_object=raw, unk_token=None, bos_token=None,
                                           eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                           model_max_length=32768)
    return TokenizersBackend(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                             pad_token="<pad>", model_max_length=4096)


def tiny_config(spec: ModelSpec, tokenizer):
    """The transformers config of a tiny spec, with the tokenizer's bos/eos/pad ids (top level and text)."""
    import transformers

    from vlplan.planner.hf_config import spec_to_hf_config

    d = dict(spec_to_hf_config(spec))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    d.update(ids)
    d["text_config"] = dict(d["text_config"], **ids)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def write_tiny_model(family: str, out: str | Path, *, text_layers: int = 2, vision_layers: int = 2,
                     seed: int = 0) -> ModelSpec:
    """Write a tiny random `family` model directory (config, safetensors, tokenizer, processor) to `out`."""
    import torch

    from . import name_cpu_accelerator

    name_cpu_accelerator()
    import transformers

    transformers.utils.logging.disable_progress_bar()

    from .processor import save_processor

    _base_of(family)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VlplanError(f"{out} exists and is not an empty directory; choose a new path")
    tokenizer = make_tokenizer(family)
    spec = tiny_spec(family, tokenizer.convert_tokens_to_ids(image_token_of(family)), text_layers, vision_layers)
    processor = make_processor(family, spec, tokenizer)
    config = tiny_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.hf_class)._from_config(config, dtype=getattr(torch, spec.dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(processor, out)
    if family.startswith("qwen"):
        # what a torchvision install builds the (unused) video processor from
        p = spec.processor
        (out / "video_preprocessor_config.json").write_text(json.dumps(
            {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": p.patch_size, "merge_size": p.merge_size,
             "temporal_patch_size": spec.vision.temporal_patch_size}, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.pad_token_id}, indent=2) + "\n")
    return spec
