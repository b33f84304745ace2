"""A LLaMA-Factory-format dataset -> training batches, the way LLaMA-Factory's supervised preprocessing builds them.

Per sample (src/llamafactory/data/processor/supervised.py and data/mm_plugin.py, v0.9.3):
- each image is pre-resized to `image_max_pixels` / `image_min_pixels` (`MMPluginMixin._preprocess_image`: PIL
  resize, int truncation; the Qwen plugin then forces a 28 px minimum side and caps the aspect ratio at 180:1);
- each `<image>` placeholder in the text becomes the family's image text (Qwen: `<|vision_start|><|image_pad|>
  <|vision_end|>`, LLaVA: `<image>`), the conversation is rendered with the checkpoint's chat template, and the
  processor's own `replace_image_token` expands each image into its run of image tokens;
- labels are the assistant turns only (IGNORE_INDEX elsewhere), each closed by the end-of-sequence token;
- a sample longer than the cutoff (LLaMA-Factory's cutoff_len) is dropped and counted, never truncated (a cut through an
  image's tokens crashes the model: "Image features and image tokens do not match").
The collator pads to the longest sample of the micro-batch (right padding) and concatenates the image tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.setup import TrainSetup
from vlplan.planner.tokens import llamafactory_preresize, qwen_plugin_preresize, uses_qwen2vl_plugin

IGNORE_INDEX = -100  # LLaMA-Factory extras/constants.py IGNORE_INDEX (and torch's cross_entropy default)
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory extras/constants.py IMAGE_PLACEHOLDER
# How the chat text names one image before the processor expands it (LLaMA-Factory Qwen2VLPlugin.process_messages)
QWEN_IMAGE_TEXT = "<|vision_start|>{token}<|vision_end|>"
# (the families whose plugin is Qwen2VLPlugin or a subclass: `Family.qwen2vl_plugin`; the others name it by the token)
ROLES = ("system", "user", "assistant")


@dataclass
class Encoded:
    """One sample as token ids and labels; its images are re-read (and re-processed) when the batch is built."""

    index: int
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int] | None
    images: list[str]


@dataclass
class DatasetStats:
    samples: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    longest_tokens: int = 0
    label_tokens: int = 0

    def to_dict(self) -> dict:
        return {"samples": self.samples, "kept": self.kept, "dropped": dict(self.dropped),
                "longest_tokens": self.longest_tokens, "label_tokens": self.label_tokens}


def load_image(path: str, setup: TrainSetup):
    """The image LLaMA-Factory hands to the processor: pre-resized (`_preprocess_image`) and RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise VlplanError(f"cannot read image {path}: {err}") from None
    size = llamafactory_preresize(image.width, image.height, setup.image_max_pixels, setup.image_min_pixels)
    if size != image.size:
        image = image.resize(size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if uses_qwen2vl_plugin(setup.model.family):
        size = qwen_plugin_preresize(image.width, image.height)
        if size != image.size:
            image = image.resize(size)
    return image


class Encoder:
    """Turns a dataset sample into token ids, labels and the processor's image inputs."""

    def __init__(self, processor, setup: TrainSetup):
        self.processor = processor
        self.setup = setup
        self.tokenizer = processor.tokenizer
        if not getattr(processor, "chat_template", None):
            raise VlplanError("the model directory has no chat template (chat_template.jinja / chat_template.json / "
                              "tokenizer_config.json); add the template the model was trained with")
        self.image_token = processor.image_token
        text = QWEN_IMAGE_TEXT if uses_qwen2vl_plugin(setup.model.family) else "{token}"
        self.image_text = text.format(token=self.image_token)
        self.eos_token = self.tokenizer.eos_token
        if self.eos_token is None:
            raise VlplanError("the tokenizer has no eos_token; set eos_token in tokenizer_config.json")
        self.bos_id = self.tokenizer.bos_token_id

    # Images --------------------------------------------------------------------------------------------------
    def image_inputs(self, paths: list[str]) -> dict:
        if not paths:
            return {}
        images = [load_image(path, self.setup) for path in paths]
        return dict(self.processor.image_processor(images=images, return_tensors="pt"))

    # Text ----------------------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        conversation = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        return self.processor.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_label) pieces: each assistant turn is a label piece.

        The assistant piece is the text the template adds for that turn after the generation prompt; it gets the
        eos token when the template does not close the turn with it (LLaMA-Factory appends it for such templates).
        """
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], generation_prompt=True)
            full = self._render(messages[:i + 1], generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise VlplanError("the chat template does not render a conversation as a prefix of its continuation; "
                                  "vlplan cannot tell the assistant turns apart with it")
            answer = full[len(prompt):]
            if self.eos_token not in answer:
                answer += self.eos_token
            pieces += [(prompt[len(done):], False), (answer, True)]
            done = full
        rest = self._render(messages, generation_prompt=False)[len(done):]
        if rest:
            pieces.append((rest, False))
        return [(text, label) for text, label in pieces if text]

    def encode(self, index: int, messages: list[dict], images: list[str]) -> Encoded:
        """Token ids and labels of one sample (raises VlplanError for a malformed sample)."""
        text = "".join(m["content"] for m in messages)
        placeholders = text.count(IMAGE_PLACEHOLDER)
        if placeholders != len(images):
            raise VlplanError(f"sample {index}: {len(images)} images but {placeholders} {IMAGE_PLACEHOLDER} "
                              f"placeholders (LLaMA-Factory: 'The number of images does not match the number of "
                              f"{IMAGE_PLACEHOLDER} tokens')")
        for message in messages:
            if message["role"] not in ROLES:
                raise VlplanError(f"sample {index}: role {message['role']!r} is not one of {', '.join(ROLES)}")
        messages = [dict(m, content=m["content"].replace(IMAGE_PLACEHOLDER, self.image_text)) for m in messages]
        replacements = []
        if images:
            inputs = self.image_inputs(images)
            replacements = [self.processor.replace_image_token(inputs, image_idx=k) for k in range(len(images))]
        input_ids: list[int] = []
        labels: list[int] = []
        image_k = 0
        for piece, is_label in self.segments(messages):
            parts = piece.split(self.image_token)
            expanded = parts[0]
            for part in parts[1:]:
                expanded += replacements[image_k] + part
                image_k += 1
            ids = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if is_label else [IGNORE_INDEX] * len(ids)
        if self.bos_id is not None and (not input_ids or input_ids[0] != self.bos_id):
            input_ids.insert(0, self.bos_id)
            labels.insert(0, IGNORE_INDEX)
        types = None
        if getattr(self.processor, "return_mm_token_type_ids", False):
            types = [int(t) for t in self.processor.create_mm_token_type_ids([input_ids])[0]]
        return Encoded(index, input_ids, labels, types, list(images))


class SupervisedDataset(torch.utils.data.Dataset):
    """The kept samples as token ids (encoded once, up front); images are processed again per item."""

    def __init__(self, samples, processor, setup: TrainSetup, cutoff_len: int):
        self.encoder = Encoder(processor, setup)
        self.stats = DatasetStats(samples=len(samples))
        self.items: list[Encoded] = []
        for sample in samples:
            if getattr(sample, "videos", None):
                raise VlplanError(f"sample {sample.index}: videos are not supported by vlplan run (images only)")
            if not any(m["role"] == "assistant" for m in sample.messages):  # LLaMA-Factory drops it too
                self.stats.dropped["no assistant turn"] += 1
                continue
            encoded = self.encoder.encode(sample.index, sample.messages, sample.images)
            if all(label == IGNORE_INDEX for label in encoded.labels):
                self.stats.dropped["no assistant turn"] += 1
                continue
            if len(encoded.input_ids) > cutoff_len:
                self.stats.dropped[f"longer than the cutoff ({cutoff_len} tokens)"] += 1
                continue
            self.items.append(encoded)
            self.stats.longest_tokens = max(self.stats.longest_tokens, len(encoded.input_ids))
            self.stats.label_tokens += sum(label != IGNORE_INDEX for label in encoded.labels)
        self.stats.kept = len(self.items)
        if not self.items:
            reasons = ", ".join(f"{n} {why}" for why, n in self.stats.dropped.items()) or "the dataset is empty"
            raise VlplanError(f"no sample left to train on ({reasons}); raise --cutoff-len or lower --image-max-pixels")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        features = {"input_ids": torch.tensor(item.input_ids), "labels": torch.tensor(item.labels)}
        if item.mm_token_type_ids is not None:
            features["mm_token_type_ids"] = torch.tensor(item.mm_token_type_ids)
        features.update(self.encoder.image_inputs(item.images))
        return features


SEQUENCE_KEYS = {"input_ids": None, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}


@dataclass
class Collator:
    """Right-pads the sequences to the longest of the micro-batch; concatenates the image tensors (Qwen's
    flattened patches and grid rows, LLaVA's pixel images) along their first dimension."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict = {}
        for key, pad in SEQUENCE_KEYS.items():
            if key not in features[0]:
                continue
            value = self.pad_token_id if pad is None else pad
            batch[key] = torch.stack([torch.nn.functional.pad(f[key], (0, longest - len(f[key])), value=value)
                                      for f in features])
        batch["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"]))
                                                for f in features])
        for key in sorted({k for f in features for k in f} - set(SEQUENCE_KEYS)):
            tensors = [f[key] for f in features if key in f]
            batch[key] = torch.cat(tensors, dim=0)
        return batch

