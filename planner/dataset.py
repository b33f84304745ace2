"""LLaMA-Factory multimodal datasets: read them, and scan them for tokens per sample, over-long samples and bad images.

`read_dataset(path)` reads the formats LLaMA-Factory reads (data/README.md, shared/reference/llamafactory.md section
5): sharegpt records (`messages` or `conversations`, `from`/`value` or `role`/`content` tags) and alpaca records
(`instruction`/`input`/`output`/`history`), in a JSON array or JSON lines, with `images`/`videos` columns, optionally
described by a `dataset_info.json` entry (columns, tags, formatting). Relative media paths resolve as LLaMA-Factory
does (`os.path.join(media_dir, path)` when that file exists, else the path as written; media_dir defaults to the
dataset folder).

`scan_dataset(path, spec)` reads every image size from its file header (image_header.py, no pixels decoded), turns it
into vision tokens with the model's rule after LLaMA-Factory's pre-resize (tokens.py), counts text tokens with the
model's tokenizer when one is given (else a stated approximation), and reports the distribution, the samples over
`cutoff_len`, missing and corrupt images and placeholder mismatches. `setup_for_dataset(setup, scan)` makes the
setup's images and sequence length those of the dataset's longest sample (or a percentile's).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from .errors import VlplanError
from .image_header import ImageError, image_size
from .spec import ModelSpec
from .setup import LF_VIDEO_FPS, LF_VIDEO_MAX_PIXELS, LF_VIDEO_MAXLEN, LF_VIDEO_MIN_PIXELS
from .tokens import LF_IMAGE_MAX_PIXELS, LF_IMAGE_MIN_PIXELS, image_tokens
from .video_scan import VideoCounter

__all__ = ["Sample", "ImageError", "image_size", "read_dataset", "scan_dataset", "ScanResult", "setup_for_dataset",
           "DatasetFormat", "TextTokenCounter"]

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER = "<image>", "<video>", "<audio>"
_PLACEHOLDERS = re.compile(r"<image>|<video>|<audio>")
ROLES = ("user", "assistant", "system")
# LLaMA-Factory's sharegpt role tags (data/README.md; data/converter.py SharegptDatasetConverter) and the OpenAI ones
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                 "system": "system", "observation": "user", "tool": "user", "function_call": "assistant",
                 "function": "assistant"}

# Text-token approximation without a tokenizer: ~3.5 characters per token for English BPE vocabularies (the
# GPT-2/Qwen/LLaMA-3 families measure 3.5-4.2 on prose; CJK text is closer to 1-1.5, so the count is low there)
CHARS_PER_TOKEN = 3.5
# Chat-template tokens around each message: ChatML (Qwen templates) writes `<|im_start|>role\n` ... `<|im_end|>\n`,
# 5 tokens; LLaMA-3's header/eot adds 5 as well (`<|start_header_id|>role<|end_header_id|>\n\n` ... `<|eot_id|>`)
TEMPLATE_TOKENS_PER_MESSAGE = 5


@dataclass(frozen=True)
class Sample:
    """One training example: its messages (roles user/assistant/system; media placeholders kept in the text) and
    its media as resolved path strings (what LLaMA-Factory opens), in order. `image_refs` are the images as written
    in the dataset (for reports)."""

    index: int
    messages: list[dict]
    images: list[str]
    videos: list[str] = field(default_factory=list)
    image_refs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset_info.json entry: formatting, column names and role tags (LLaMA-Factory's defaults when absent;
    None = detect per record)."""

    formatting: str | None = None  # alpaca | sharegpt
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry: dict, name: str) -> "DatasetFormat":
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise VlplanError(f"dataset_info entry {name}: formatting {formatting!r} is not alpaca or sharegpt")
        columns, tags = entry.get("columns", {}), entry.get("tags", {})
        if not isinstance(columns, dict) or not isinstance(tags, dict):
            raise VlplanError(f"dataset_info entry {name}: columns and tags must be objects")
        return cls(formatting, dict(columns), dict(tags))


# Reading ------------------------------------------------------------------------------------------------------------
def read_dataset(path: str | Path, *, dataset_dir: str | Path | None = None, media_dir: str | Path | None = None,
                 dataset_info: str | Path | dict | None = None) -> list[Sample]:
    """Every sample of a LLaMA-Factory dataset file (JSON or JSONL), or of a dataset named in `dataset_info`.

    `dataset_dir` is where `dataset_info`'s file names live (default: the folder of dataset_info.json, else of the
    data file); `media_dir` is where relative image/video paths live (default: dataset_dir, else the data file's
    folder). `dataset_info` is a dataset_info.json path, its loaded dict, or one entry of it.
    """
    files, fmt, media_root = _locate(path, dataset_dir, media_dir, dataset_info)
    resolver = _MediaResolver(media_root)
    samples: list[Sample] = []
    for file in files:
        for record in _records(file):
            samples.append(_sample(record, len(samples), fmt, resolver, file))
    return samples


def _locate(path, dataset_dir, media_dir, dataset_info) -> tuple[list[Path], DatasetFormat, Path]:
    path = Path(path).expanduser()
    fmt = DatasetFormat()
    root = Path(dataset_dir) if dataset_dir else None
    if dataset_info is not None:
        entry, name, info_dir = _info_entry(dataset_info, path)
        fmt = DatasetFormat.from_entry(entry, name)
        if not path.exists():  # a dataset name: its file_name lives in dataset_dir (LLaMA-Factory's layout)
            if "file_name" not in entry:
                raise VlplanError(f"dataset_info entry {name} has no file_name (hub datasets are not read: download "
                                  "the data and point at its file)")
            root = root or info_dir
            path = root / entry["file_name"]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise VlplanError(f"dataset folder {path} holds no .json or .jsonl file")
    elif path.is_file():
        files = [path]
    else:
        raise VlplanError(f"dataset {path} does not exist")
    # LLaMA-Factory: media_dir defaults to dataset_dir; a file given directly stands for its own folder
    media_root = Path(media_dir) if media_dir else root or (path if path.is_dir() else path.parent)
    return files, fmt, media_root


def _info_entry(dataset_info, data_path: Path) -> tuple[dict, str, Path]:
    if isinstance(dataset_info, dict):
        info, info_dir = dataset_info, data_path.parent
    else:
        from .io.deepspeed import load_json

        info = load_json(dataset_info, "dataset_info file")
        info_dir = Path(dataset_info).parent
        if not isinstance(info, dict):
            raise VlplanError(f"{dataset_info}: dataset_info.json is a JSON object of dataset entries")
    if "file_name" in info or "columns" in info or "formatting" in info:
        return info, data_path.name, info_dir  # a single entry
    if data_path.name in info and not data_path.is_file():
        entry = info[str(data_path)] if str(data_path) in info else info[data_path.name]
        return entry, data_path.name, info_dir
    matches = [(name, entry) for name, entry in info.items()
               if isinstance(entry, dict) and Path(str(entry.get("file_name", ""))).name == data_path.name]
    if len(matches) != 1:
        names = ", ".join(list(info)[:8])
        what = "no entry" if not matches else f"{len(matches)} entries"
        raise VlplanError(f"dataset_info has {what} with file_name {data_path.name}; give the dataset's name "
                          f"instead of a file (entries: {names})")
    name, entry = matches[0]
    return entry, name, info_dir


def _records(file: Path) -> Iterable[dict]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VlplanError(f"{file}: not a UTF-8 text file") from None
    stripped = text.lstrip()
    if not stripped:
        raise VlplanError(f"{file} is empty")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise VlplanError(f"{file}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                raise VlplanError(f"{file}: record {index} is a {type(record).__name__}, not an object")
        return data
    if stripped[0] == "{" and file.suffix != ".jsonl":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines (several objects): read line by line below
        if isinstance(whole, dict):
            # LLaMA-Factory's dataset files hold a list of records (data/README.md); HF datasets would read a lone
            # object as one row or as columns, never as the samples it was meant to hold
            raise VlplanError(f"{file} holds one JSON object, not a list of samples; a LLaMA-Factory dataset is a "
                              "JSON list of records ([{...}, ...]) or JSON lines (.jsonl)")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise VlplanError(f"{file}: line {number} is not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise VlplanError(f"{file}: line {number} is a {type(record).__name__}, not an object")
        records.append(record)
    return records


class _MediaResolver:
    """LLaMA-Factory's rule (data/converter.py `_find_medias`): media_dir/path when that file exists, else as is."""

    def __init__(self, media_dir: Path):
        self.media_dir = media_dir
        self.cache: dict[str, str] = {}

    def __call__(self, ref: str) -> str:
        resolved = self.cache.get(ref)
        if resolved is None:
            if ref.startswith(("http://", "https://", "data:")):
                resolved = ref
            else:
                joined = self.media_dir / ref
                resolved = str(joined) if joined.is_file() or not Path(ref).is_file() else ref
            self.cache[ref] = resolved
        return resolved


def _sample(record: dict, index: int, fmt: DatasetFormat, resolve: _MediaResolver, file: Path) -> Sample:
    where = f"{file}: record {index}"
    formatting = fmt.formatting or _detect_formatting(record, fmt, where)
    messages = _sharegpt(record, fmt, where) if formatting == "sharegpt" else _alpaca(record, fmt, where)
    image_refs = _media(record, fmt.columns.get("images") or _first(record, ("images", "image")), where)
    video_refs = _media(record, fmt.columns.get("videos") or _first(record, ("videos", "video")), where)
    return Sample(index, messages, [resolve(ref) for ref in image_refs], [resolve(ref) for ref in video_refs],
                  image_refs)


def _first(record: dict, keys) -> str | None:
    return next((key for key in keys if key in record), None)


def _detect_formatting(record: dict, fmt: DatasetFormat, where: str) -> str:
    if fmt.columns.get("messages") in record or "messages" in record or "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise VlplanError(f"{where} has neither messages/conversations (sharegpt) nor instruction/output (alpaca); "
                      f"its keys are {', '.join(sorted(record)) or 'none'}")


def _text(content, where: str) -> str:
    """Message content as text; OpenAI-style part lists become text with <image>/<video> placeholders."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type", "text")
                parts.append(part.get("text", "") if kind == "text" else
                             IMAGE_PLACEHOLDER if kind in ("image", "image_url") else
                             VIDEO_PLACEHOLDER if kind == "video" else "")
        return "".join(parts)
    raise VlplanError(f"{where}: message content must be text, got {type(content).__name__}")


def _sharegpt(record: dict, fmt: DatasetFormat, where: str) -> list[dict]:
    column = fmt.columns.get("messages") or _first(record, ("messages", "conversations"))
    turns = record.get(column)
    if not isinstance(turns, list):
        raise VlplanError(f"{where}: {column} must be a list of messages, got {type(turns).__name__}")
    tags = fmt.tags
    messages = []
    system_column = fmt.columns.get("system") or ("system" if isinstance(record.get("system"), str) else None)
    if system_column and record.get(system_column):
        messages.append({"role": "system", "content": _text(record[system_column], where)})
    tools = record.get(fmt.columns.get("tools") or "tools")
    if isinstance(tools, str) and tools:
        messages.append({"role": "system", "content": tools})
    user_tag, assistant_tag = tags.get("user_tag"), tags.get("assistant_tag")
    for turn in turns:
        if not isinstance(turn, dict):
            raise VlplanError(f"{where}: a message must be an object, got {type(turn).__name__}")
        role_tag = tags.get("role_tag") or ("from" if "from" in turn else "role")
        content_tag = tags.get("content_tag") or ("value" if "value" in turn else "content")
        role = turn.get(role_tag)
        if role == user_tag and user_tag:
            role = "user"
        elif role == assistant_tag and assistant_tag:
            role = "assistant"
        else:
            role = _ROLE_ALIASES.get(role) or _ROLE_ALIASES.get(_tag_role(role, tags))
        if role is None:
            raise VlplanError(f"{where}: unknown role {turn.get(role_tag)!r} (expected human/gpt, user/assistant, "
                              "system, observation or function_call)")
        messages.append({"role": role, "content": _text(turn.get(content_tag), where)})
    _preference(record, fmt, messages, where)
    return messages


def _tag_role(role, tags: dict) -> str | None:
    for key, value in (("observation_tag", "observation"), ("function_tag", "function_call"),
                       ("system_tag", "system")):
        if tags.get(key) and role == tags[key]:
            return value
    return None


def _preference(record: dict, fmt: DatasetFormat, messages: list[dict], where: str) -> None:
    """Ranking datasets (chosen/rejected): the longer answer is the one that sets the sequence length."""
    chosen, rejected = record.get(fmt.columns.get("chosen") or "chosen"), record.get(
        fmt.columns.get("rejected") or "rejected")
    answers = []
    for answer in (chosen, rejected):
        if isinstance(answer, dict):
            answer = answer.get(fmt.tags.get("content_tag") or ("value" if "value" in answer else "content"))
        if answer is not None:
            answers.append(_text(answer, where))
    if answers:
        messages.append({"role": "assistant", "content": max(answers, key=len)})


def _alpaca(record: dict, fmt: DatasetFormat, where: str) -> list[dict]:
    columns = fmt.columns
    messages = []
    system = record.get(columns.get("system") or "system")
    if system:
        messages.append({"role": "system", "content": _text(system, where)})
    history = record.get(columns.get("history") or "history") or []
    if not isinstance(history, list):
        raise VlplanError(f"{where}: history must be a list of [query, response] pairs")
    for pair in history:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise VlplanError(f"{where}: history must be a list of [query, response] pairs")
        messages += [{"role": "user", "content": _text(pair[0], where)},
                     {"role": "assistant", "content": _text(pair[1], where)}]
    # AlpacaDatasetConverter: the query is instruction and input joined by a newline
    query = [_text(record.get(columns.get("prompt") or "instruction"), where),
             _text(record.get(columns.get("query") or "input"), where)]
    messages.append({"role": "user", "content": "\n".join(q for q in query if q)})
    response = record.get(columns.get("response") or "output")
    if isinstance(response, list):  # ranking: several responses
        response = max((_text(r, where) for r in response), key=len, default="")
    messages.append({"role": "assistant", "content": _text(response, where)})
    return messages


def _media(record: dict, column: str | None, where: str) -> list[str]:
    if column is None or record.get(column) is None:
        return []
    value = record[column]
    items = value if isinstance(value, list) else [value]
    refs = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("path") or item.get("url")
            if item is None:
                raise VlplanError(f"{where}: embedded image bytes are not read; store the images as files")
        if not isinstance(item, str):
            raise VlplanError(f"{where}: {column} must hold file paths, got {type(item).__name__}")
        refs.append(item)
    return refs


# Text tokens --------------------------------------------------------------------------------------------------------
class TextTokenCounter:
    """Counts the tokens of message texts: with a tokenizer (`tokenizers`, else `transformers`) or approximately."""

    def __init__(self, tokenizer: str | Path | None = None):
        self.encode: Callable[[list[str]], list[int]] | None = None
        self.method = f"approximate: characters / {CHARS_PER_TOKEN} per message text (no tokenizer given)"
        self.warning = None
        if tokenizer is not None:
            self._load(Path(tokenizer))

    def _load(self, path: Path) -> None:
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            from tokenizers import Tokenizer

            if file.is_file():
                tok = Tokenizer.from_file(str(file))
                self.encode = lambda texts: [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
                self.method = f"tokenizer {file}"
                return
        except ImportError:
            pass
        except Exception as err:  # a broken tokenizer.json: fall back to the next way
            self.warning = f"tokenizer {file} could not be loaded ({err}); "
        if path.is_dir():
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(path))
                self.encode = lambda texts: [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
                self.method = f"tokenizer {path} (transformers)"
                return
            except Exception as err:
                self.warning = (self.warning or "") + f"no usable tokenizer in {path} ({type(err).__name__}); "
        self.warning = (self.warning or f"no tokenizer in {path}; ") + "text tokens are approximate"

    def __call__(self, texts: list[str]) -> list[int]:
        if self.encode is None:
            return [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]
        return self.encode(texts) if texts else []


# Scan ---------------------------------------------------------------------------------------------------------------
@dataclass
class ScanResult:
    path: str
    model: str
    text_tokens_method: str
    image_max_pixels: int | None
    image_min_pixels: int | None
    cutoff_len: int
    text_tokens: list[int]  # per sample, chat-template tokens included
    vision_tokens: list[int]  # per sample: image placeholder tokens in the language-model sequence
    special_tokens: list[int]  # per sample: the tokens the processor puts around images
    image_sizes: list[tuple[tuple[int, int], ...]]  # per sample, the readable images' stored sizes
    missing_images: list[str]  # as written in the dataset
    corrupt_images: dict[str, str]  # as written -> why
    remote_images: list[str]
    placeholder_mismatches: list[int]  # samples whose <image>/<video> count differs from their media
    videos: int
    warnings: list[str] = field(default_factory=list)
    video_clips: list[tuple] = field(default_factory=list)  # per sample, the readable videos (planner/video.py)
    missing_videos: list[str] = field(default_factory=list)
    corrupt_videos: dict[str, str] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return len(self.text_tokens)

    @property
    def total_tokens(self) -> list[int]:
        return [t + v + s for t, v, s in zip(self.text_tokens, self.vision_tokens, self.special_tokens)]

    @property
    def over_cutoff(self) -> list[int]:
        return [i for i, total in enumerate(self.total_tokens) if total > self.cutoff_len]

    def pick(self, percentile: float | None = None) -> int:
        """The sample to plan for: the longest (ties: most vision tokens), or the one at `percentile` of total
        tokens (nearest rank)."""
        totals = self.total_tokens
        if not totals:
            raise VlplanError(f"dataset {self.path} has no samples")
        target = max(totals) if percentile is None else percentile_of(totals, percentile)
        return max((i for i, t in enumerate(totals) if t == target), key=lambda i: (self.vision_tokens[i], -i))

    def to_dict(self) -> dict:
        totals = self.total_tokens
        longest = self.pick() if totals else None
        return {
            "path": self.path,
            "model": self.model,
            "samples": self.samples,
            "images": sum(len(s) for s in self.image_sizes),  # readable ones; see missing/corrupt/remote
            "videos": self.videos,
            "text_tokens_method": self.text_tokens_method,
            "image_max_pixels": self.image_max_pixels,
            "image_min_pixels": self.image_min_pixels,
            "cutoff_len": self.cutoff_len,
            "text_tokens": distribution(self.text_tokens),
            "vision_tokens": distribution(self.vision_tokens),
            "total_tokens": distribution(totals),
            "longest": None if longest is None else {
                "index": longest, "total_tokens": totals[longest], "vision_tokens": self.vision_tokens[longest],
                "images": [f"{w}x{h}" for w, h in self.image_sizes[longest]]},
            "over_cutoff": self.over_cutoff,
            "missing_images": self.missing_images,
            "corrupt_images": sorted(self.corrupt_images),
            "corrupt_reasons": self.corrupt_images,
            "remote_images": self.remote_images,
            "placeholder_mismatches": self.placeholder_mismatches,
            **({"longest_videos": [clip.label() for clip in self.video_clips[longest]],
                "missing_videos": self.missing_videos, "corrupt_videos": self.corrupt_videos}
               if self.videos else {}),
            "warnings": self.warnings,
        }


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def percentile_of(values: list[int], percentile: float) -> int:
    """Nearest-rank percentile: the smallest value with at least `percentile`% of the values at or below it."""
    if not 0 < percentile <= 100:
        raise VlplanError(f"--percentile must be in (0, 100], got {percentile}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percentile / 100 * len(ordered)) - 1)]


def distribution(values: list[int]) -> dict:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    return {"p50": percentile_of(values, 50), "p90": percentile_of(values, 90), "p99": percentile_of(values, 99),
            "max": max(values), "mean": round(sum(values) / len(values), 2)}


def scan_dataset(path: str | Path, spec: ModelSpec, *, dataset_dir: str | Path | None = None,
                 media_dir: str | Path | None = None, dataset_info: str | Path | dict | None = None,
                 image_max_pixels: int | None = LF_IMAGE_MAX_PIXELS,
                 image_min_pixels: int | None = LF_IMAGE_MIN_PIXELS, cutoff_len: int = 2048,
                 tokenizer: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None, video_max_pixels: int = LF_VIDEO_MAX_PIXELS,
                 video_min_pixels: int = LF_VIDEO_MIN_PIXELS, video_fps: float = LF_VIDEO_FPS,
                 video_maxlen: int = LF_VIDEO_MAXLEN) -> ScanResult:
    """Scan a dataset for `spec`: per-sample text, vision and total tokens, over-cutoff samples, bad images.

    Missing and corrupt images and videos are reported by name and the scan goes on (their tokens are not counted).
    Videos are read with PyAV and counted with LLaMA-Factory's video caps (planner/video_scan.py).
    `progress(done, total)` is called every few thousand samples.
    """
    if cutoff_len <= 0:
        raise VlplanError(f"--cutoff-len must be positive, got {cutoff_len}")
    samples = read_dataset(path, dataset_dir=dataset_dir, media_dir=media_dir, dataset_info=dataset_info)
    if not samples:
        raise VlplanError(f"dataset {path} has no samples")
    counter = TextTokenCounter(tokenizer)
    warnings = [counter.warning] if counter.warning else []
    sizes: dict[str, tuple[int, int] | str | None] = {}  # resolved path -> size, why corrupt, or missing
    token_cache: dict[tuple[int, int], tuple[int, int]] = {}
    missing, corrupt, remote = {}, {}, {}  # dicts keep first-seen order and drop repeats
    text_tokens, vision_tokens, special_tokens, image_sizes, mismatches = [], [], [], [], []
    videos = 0
    video_counter = VideoCounter(spec, video_max_pixels=video_max_pixels, video_min_pixels=video_min_pixels,
                                 video_fps=video_fps, video_maxlen=video_maxlen)
    video_clips = []
    step = 2000
    for start in range(0, len(samples), step):
        chunk = samples[start:start + step]
        texts, owners = [], []
        for sample in chunk:
            for message in sample.messages:
                texts.append(_PLACEHOLDERS.sub("", message["content"]))
                owners.append(sample.index)
        counts = counter(texts)
        per_sample = dict.fromkeys((s.index for s in chunk), 0)
        for owner, count in zip(owners, counts):
            per_sample[owner] += count
        for sample in chunk:
            text_tokens.append(per_sample[sample.index] + TEMPLATE_TOKENS_PER_MESSAGE * len(sample.messages))
            readable, llm, special = [], 0, 0
            for ref, resolved in zip(sample.image_refs, sample.images):
                if resolved.startswith(("http://", "https://", "data:")):
                    remote[ref] = None
                    continue
                if resolved not in sizes:
                    try:
                        sizes[resolved] = image_size(resolved)
                    except ImageError as err:
                        # a file that exists but does not parse is corrupt; otherwise it is missing
                        sizes[resolved] = str(err).split(": ", 1)[-1] if Path(resolved).exists() else None
                size = sizes[resolved]
                if size is None:
                    missing[ref] = None
                    continue
                if isinstance(size, str):
                    corrupt[ref] = size
                    continue
                if size not in token_cache:
                    t = image_tokens(spec, *size, image_max_pixels=image_max_pixels,
                                     image_min_pixels=image_min_pixels)
                    token_cache[size] = (t.llm_tokens, t.special_tokens)
                tokens, specials = token_cache[size]
                readable.append(size)
                llm += tokens
                special += specials
            video_llm, video_special, clips = video_counter.count(sample.videos)
            vision_tokens.append(llm + video_llm)
            special_tokens.append(special + video_special)
            image_sizes.append(tuple(readable))
            video_clips.append(clips)
            videos += len(sample.videos)
            text = "".join(m["content"] for m in sample.messages)
            if (text.count(IMAGE_PLACEHOLDER) != len(sample.images)
                    or text.count(VIDEO_PLACEHOLDER) != len(sample.videos)):
                mismatches.append(sample.index)
        if progress is not None:
            progress(min(start + step, len(samples)), len(samples))
    warnings += video_counter.warnings()
    if mismatches:
        warnings.append(f"{_plural(len(mismatches), 'sample')} with a different number of <image>/<video> "
                        "placeholders than media: LLaMA-Factory stops with 'The number of images does not match the "
                        "number of <image> tokens'")
    if missing or corrupt:
        warnings.append(f"{_plural(len(missing), 'missing image')} and {_plural(len(corrupt), 'corrupt image')}: "
                        "their tokens are not counted")
    if remote:
        warnings.append(f"{_plural(len(remote), 'remote image')} (URLs) not fetched: their tokens are not counted")
    return ScanResult(path=str(path), model=spec.name, text_tokens_method=counter.method,
                      image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels, cutoff_len=cutoff_len,
                      text_tokens=text_tokens, vision_tokens=vision_tokens, special_tokens=special_tokens,
                      image_sizes=image_sizes, missing_images=sorted(missing), corrupt_images=dict(sorted(
                          corrupt.items())), remote_images=sorted(remote), placeholder_mismatches=mismatches,
                      videos=videos, warnings=warnings, video_clips=video_clips,
                      missing_videos=sorted(video_counter.missing), corrupt_videos=dict(sorted(
                          video_counter.corrupt.items())))


def _packed_setup(setup, scan: ScanResult, percentile: float | None):
    """With packing, a row holds cutoff_len tokens of several samples (planner/packing.py): plan for the row whose
    samples bring the most vision tokens, with all their images and videos."""
    from .packing import pack

    _check_scan(setup, scan)
    totals = scan.total_tokens
    packing = pack(totals, setup.seq_len)
    if not packing.rows:
        raise VlplanError(f"with packing, every sample is longer than cutoff_len - 1 = {setup.seq_len - 1} tokens "
                          "and LLaMA-Factory drops them all; raise cutoff_len")
    row = max(packing.rows, key=lambda r: (sum(scan.vision_tokens[i] for i in r), -min(r)))
    warnings = [f"packing: {len(totals)} samples in {len(packing.rows)} rows of {setup.seq_len} tokens "
                f"(LLaMA-Factory's greedy knapsack; up to {max(packing.samples_per_row())} samples a row); planning "
                f"for the row of samples {', '.join(f'#{i}' for i in sorted(row))}, the most vision tokens "
                f"({sum(scan.vision_tokens[i] for i in row)})"]
    if percentile is not None:
        warnings.append("--percentile is ignored with packing: every row holds cutoff_len tokens")
    if packing.dropped:
        warnings.append(f"{_plural(len(packing.dropped), 'sample')} longer than cutoff_len - 1 = {setup.seq_len - 1} "
                        "tokens, which LLaMA-Factory drops when packing")
    warnings += scan.warnings
    images = tuple(size for i in sorted(row) for size in scan.image_sizes[i])
    clips = tuple(clip for i in sorted(row) for clip in (scan.video_clips[i] if scan.video_clips else ()))
    return replace(setup, images=images, videos=clips), warnings


def _check_scan(setup, scan: ScanResult) -> None:
    if (setup.image_max_pixels, setup.image_min_pixels) != (scan.image_max_pixels, scan.image_min_pixels):
        raise VlplanError("the scan used other image_max_pixels/image_min_pixels than the setup; scan again with "
                          "the setup's values")
    if scan.model != setup.model.name:
        raise VlplanError(f"the scan counted tokens for {scan.model}, the setup is {setup.model.name}")


def setup_for_dataset(setup, scan: ScanResult, percentile: float | None = None):
    """The setup with the images and sequence length of the dataset's longest sample (or the sample at
    `percentile` of total tokens), and warnings about the samples it does not cover. -> (TrainSetup, warnings)"""
    if setup.packing:
        return _packed_setup(setup, scan, percentile)
    index = scan.pick(percentile)
    totals = scan.total_tokens
    seq_len = totals[index]
    warnings = []
    if percentile is not None:
        longer = sum(1 for t in totals if t > seq_len)
        warnings.append(f"planning for the p{percentile:g} sample #{index} ({totals[index]} tokens): "
                        f"{_plural(longer, 'sample')} ({longer / len(totals):.1%}) are longer and need more memory "
                        "than this estimate")
    if totals[index] > scan.cutoff_len:
        over = len(scan.over_cutoff)
        warnings.append(f"sample #{index} needs {totals[index]} tokens, above cutoff_len {scan.cutoff_len}; the "
                        f"estimate uses {seq_len}: raise cutoff_len to at least {totals[index]} or drop the "
                        f"{_plural(over, 'over-cutoff sample')} (LLaMA-Factory would cut their image tokens and "
                        "crash)")
    elif scan.over_cutoff:
        warnings.append(f"{_plural(len(scan.over_cutoff), 'sample')} exceed cutoff_len {scan.cutoff_len}: "
                        "LLaMA-Factory would cut their image tokens and crash with 'Image features and image tokens "
                        "do not match'")
    warnings += scan.warnings
    if (setup.image_max_pixels, setup.image_min_pixels) != (scan.image_max_pixels, scan.image_min_pixels):
        raise VlplanError("the scan used other image_max_pixels/image_min_pixels than the setup; scan again with "
                          "the setup's values")
    if scan.model != setup.model.name:
        raise VlplanError(f"the scan counted tokens for {scan.model}, the setup is {setup.model.name}")
    clips = scan.video_clips[index] if scan.video_clips else ()
    return replace(setup, images=scan.image_sizes[index], videos=clips, seq_len=max(seq_len, 1)), warnings
