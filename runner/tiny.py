"""Tiny random models of a family that transformers loads offline: smoke tests of a pipeline, and our tests.

A tiny model keeps everything that makes the family's training step what it is (the transformers class, the
image processor and its patch/merge sizes, the special tokens and the chat template) and shrinks only the widths
and depths. The config is derived from a registry spec (`dataclasses.replace` + `spec_to_hf_config`), so a tiny
model exercises the same code as the spec it shrinks; the tokenizer is a small byte-level BPE trained here on a
fixed corpus (deterministic), with the family's special tokens at the ids the config names.

What is the family's own (its special tokens, chat template, tokenizer and processor classes, how its vision tower
and projector shrink) lives in the family's `tiny` part (planner/families/<family>/tiny.py, named by the family
registry); this module is the shared builder. Family tiny modules import transformers only inside functions, so
`TINY_FAMILIES` is known without torch.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from vlplan.planner.errors import VlplanError
from vlplan.planner.families import FAMILIES
from vlplan.planner.registry import resolve
from vlplan.planner.spec import ModelSpec

# Every text width must be a multiple of 8; Qwen's M-RoPE sections (16, 24, 24) need head_dim 128.
TINY_VOCAB_SIZE = 1024
TINY_TEXT = dict(hidden_size=256, intermediate_size=512, num_heads=2, num_kv_heads=1, head_dim=128,
                 vocab_size=TINY_VOCAB_SIZE)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_heads=4)

# The text the BPE merges are learned from: the chat templates' words and everyday captioning English.
_CORPUS = """system user assistant USER ASSISTANT You are a helpful assistant.
What is in the image? What is shown in this picture? Describe the image. Describe the picture in detail.
The image shows a red square on a blue background. There is a green circle in the middle of a white image.
A photo of a cat sitting on a table next to a window. Two people are walking along the beach at sunset.
The color of the shape is red, green, blue, yellow, black or white. How many objects are there in the image?
There are three objects: a square, a circle and a triangle. Answer the question about the picture briefly.
Yes. No. The answer is one, two, three, four, five, six, seven, eight, nine or ten. left right top bottom
"""



@lru_cache(maxsize=1)
def _tiny_modules() -> dict:
    """Tiny family name ("qwen2.5-vl") -> the family tiny module that builds it, from the family registry."""
    modules = {}
    for record in FAMILIES:
        path = record.tiny and record.module("tiny")
        if path:
            module = importlib.import_module(path)
            modules.update({name: module for name in module.TINY_MODELS})
    return modules


def _module(family: str):
    if family not in _tiny_modules():
        raise VlplanError(f"--family {family!r} is not one of {', '.join(TINY_FAMILIES)}")
    return _tiny_modules()[family]


# Tiny family -> the registry spec it shrinks
TINY_FAMILIES = {name: module.TINY_MODELS[name] for name, module in _tiny_modules().items()}


def tiny_family_for(spec: ModelSpec) -> str:
    """The tiny family with the same model class, processor and vision tower as `spec` (`--smoke-test`)."""
    for family, base in TINY_FAMILIES.items():
        shrunk = resolve(base)
        if shrunk.family == spec.family and shrunk.vision.arch == spec.vision.arch:
            return family
    raise VlplanError(f"no tiny model for {spec.name} ({spec.family}, {spec.vision.arch} vision tower); tiny "
                      f"models exist for {', '.join(TINY_FAMILIES)}")


def image_token_of(family: str) -> str:
    return _module(family).IMAGE_TOKEN


def train_tokenizer(family: str):
    """A byte-level BPE (Qwen's pre-tokenizer) with the family's special tokens; deterministic."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    module = _module(family)
    leading, trailing = module.LEADING_TOKENS, module.TRAILING_TOKENS
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
    if module.BOS_TOKEN:
        bos, bos_id = module.BOS_TOKEN, tokenizer.token_to_id(module.BOS_TOKEN)
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                 special_tokens=[(bos, bos_id)])
    return tokenizer


def tiny_spec(family: str, image_token_id: int, text_layers: int = 2, vision_layers: int = 2) -> ModelSpec:
    """The registry spec of `family`, shrunk; the image token at `image_token_id` of the tiny tokenizer."""
    module = _module(family)
    spec = resolve(TINY_FAMILIES[family])
    text = replace(spec.text, num_layers=text_layers, **TINY_TEXT)
    vision = replace(spec.vision, num_layers=vision_layers, **TINY_VISION)
    vision, projector, processor = module.shrink(spec, text, vision)
    return replace(spec, name=f"tiny-{family}", hf_id=f"tiny-{family}", text=text, vision=vision,
                   projector=projector, processor=processor, image_token_id=image_token_id, aliases=())


def make_processor(family: str, spec: ModelSpec, tokenizer):
    """The family's transformers processor (PIL image processor backend: no torchvision needed)."""
    return _module(family).make_processor(family, spec, tokenizer)


def make_tokenizer(family: str):
    """The family's transformers tokenizer around `train_tokenizer`."""
    return _module(family).make_tokenizer(train_tokenizer(family))


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

    _module(family)
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
    _module(family).write_extra_files(spec, out)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.pad_token_id}, indent=2) + "\n")
    return spec
