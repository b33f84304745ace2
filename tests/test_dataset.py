"""Dataset reading and scanning on generated datasets with real image files written by PIL: the header parser against
PIL, exact token counts against `image_tokens` on the true sizes, missing/corrupt images, formats, errors."""

import json
import random
import time
from pathlib import Path

import pytest
from PIL import Image

from vlplan.planner.dataset import (TEMPLATE_TOKENS_PER_MESSAGE, ImageError, Sample, image_size, percentile_of,
                                    read_dataset, scan_dataset, setup_for_dataset)
from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup
from vlplan.planner.tokens import image_tokens

QWEN = resolve("qwen2.5-vl-7b")


# Header parser vs PIL -------------------------------------------------------------------------------------------------
def _write(path: Path, fmt: str, size, mode="RGB", **save):
    Image.new(mode, size, color=None if mode == "1" else 0).save(path, format=fmt, **save)
    return path


CASES = [
    ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "L", {}), ("PNG", "P", {}), ("PNG", "1", {}),
    ("PNG", "I;16", {}), ("JPEG", "RGB", {}), ("JPEG", "L", {}), ("JPEG", "RGB", {"progressive": True}),
    ("JPEG", "CMYK", {}), ("JPEG", "RGB", {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00" + b"\x00" * 5000}),
    ("GIF", "P", {}), ("GIF", "L", {}), ("BMP", "RGB", {}), ("BMP", "L", {}), ("BMP", "1", {}), ("BMP", "RGBA", {}),
    ("WEBP", "RGB", {"lossless": False}), ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {"lossless": False}),
    ("TIFF", "RGB", {}),  # no header parser: PIL's lazy open
]


def test_header_parser_matches_pil(tmp_path):
    rng = random.Random(0)
    checked = 0
    for index, (fmt, mode, save) in enumerate(CASES):
        for trial in range(6):
            w, h = rng.choice([1, 2, 3, 17, 255, 256, 641]), rng.choice([1, 5, 64, 333, 1000])
            if trial == 0:
                w, h = 1, 1
            if fmt == "WEBP" and (w > 16383 or h > 16383):
                continue
            path = _write(tmp_path / f"{index}_{trial}.{fmt.lower()}", fmt, (w, h), mode, **save)
            with Image.open(path) as image:
                assert image_size(path) == image.size == (w, h), (fmt, mode, save, w, h)
            checked += 1
    assert checked == 6 * len(CASES)


def test_header_parser_extreme_sizes(tmp_path):
    start = time.perf_counter()
    huge = _write(tmp_path / "huge.png", "PNG", (8000, 6000), mode="1")  # 1 bit per pixel: a 6 MB raster
    tall = _write(tmp_path / "tall.png", "PNG", (1, 2000))
    wide = _write(tmp_path / "wide.jpg", "JPEG", (3000, 2), mode="L")
    assert time.perf_counter() - start < 10
    assert (image_size(huge), image_size(tall), image_size(wide)) == ((8000, 6000), (1, 2000), (3000, 2))


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                                       ("WEBP", "RGB")])
def test_truncated_files_are_corrupt(fmt, mode, tmp_path):
    path = _write(tmp_path / f"x.{fmt.lower()}", fmt, (200, 150), mode, **({"quality": 95} if fmt == "JPEG" else {}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        image_size(path)
    with pytest.raises(OSError):  # PIL fails on the same file when it opens or decodes it
        with Image.open(path) as image:
            image.load()


def test_jpeg_with_data_after_the_image_is_not_corrupt(tmp_path):
    # motion photos append a video after the JPEG's end-of-image marker
    path = _write(tmp_path / "motion.jpg", "JPEG", (320, 240))
    path.write_bytes(path.read_bytes() + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    assert image_size(path) == (320, 240)


def test_unreadable_files(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        image_size(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        image_size(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("not an image at all")
    with pytest.raises(ImageError, match="not an image"):
        image_size(tmp_path / "text.png")
    assert issubclass(ImageError, VlplanError)


# Scanning -------------------------------------------------------------------------------------------------------------
@pytest.fixture
def media(tmp_path):
    """Images of every awkward kind, by name -> true (width, height)."""
    folder = tmp_path / "data" / "imgs"
    folder.mkdir(parents=True)
    sizes = {"tiny.png": (1, 1), "photo.jpg": (1920, 1080), "huge.png": (8000, 6000), "tall.png": (1, 2000),
             "square.webp": (448, 448), "gray.jpg": (640, 480)}
    for name, size in sizes.items():
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]
        _write(folder / name, fmt, size, mode="1" if name == "huge.png" else "RGB")
    photo = (folder / "photo.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(photo[: len(photo) // 3])
    return tmp_path / "data", sizes


def _tokens(spec, size):
    t = image_tokens(spec, *size)
    return t.llm_tokens, t.special_tokens


def _dataset(data_dir: Path):
    records = [
        {"messages": [{"role": "user", "content": "<image>What is this?"},
                      {"role": "assistant", "content": "A photo. " * 40}], "images": ["imgs/photo.jpg"]},
        {"conversations": [{"from": "human", "value": "<image><image>Compare."}, {"from": "gpt", "value": "Same."}],
         "images": ["imgs/huge.png", "imgs/tall.png"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Hi"},
                      {"role": "assistant", "content": "Hello"}], "images": ["imgs/tiny.png"]},
        {"messages": [{"role": "user", "content": "<image>Lost"}, {"role": "assistant", "content": "?"}],
         "images": ["imgs/missing.png"]},
        {"messages": [{"role": "user", "content": "<image>Broken"}, {"role": "assistant", "content": "?"}],
         "images": ["imgs/broken.jpg"]},
        {"instruction": "Describe <image>", "input": "in detail", "output": "Gray.", "images": ["imgs/gray.jpg"]},
        {"messages": [{"role": "user", "content": "No placeholder here"}, {"role": "assistant", "content": "x"}],
         "images": ["imgs/square.webp"]},
        {"messages": [{"role": "user", "content": "Text only " * 300}, {"role": "assistant", "content": "ok"}]},
    ]
    path = data_dir / "train.json"
    path.write_text(json.dumps(records))
    return path, records


@pytest.mark.parametrize("model", ["qwen2.5-vl-7b", "llava-1.5-7b", "internvl3-8b"])
def test_scan_gives_exact_vision_tokens(media, model):
    data_dir, sizes = media
    path, _ = _dataset(data_dir)
    spec = resolve(model)
    scan = scan_dataset(path, spec, cutoff_len=1024)
    per_sample = [["photo.jpg"], ["huge.png", "tall.png"], ["tiny.png"], [], [], ["gray.jpg"], ["square.webp"], []]
    for index, names in enumerate(per_sample):
        tokens = [_tokens(spec, sizes[n]) for n in names]
        assert scan.vision_tokens[index] == sum(t[0] for t in tokens), (model, index)
        assert scan.special_tokens[index] == sum(t[1] for t in tokens)
        assert scan.image_sizes[index] == tuple(sizes[n] for n in names)
    assert scan.missing_images == ["imgs/missing.png"]
    assert list(scan.corrupt_images) == ["imgs/broken.jpg"] and "truncated" in scan.corrupt_images["imgs/broken.jpg"]
    assert scan.placeholder_mismatches == [6]
    totals = scan.total_tokens
    assert scan.over_cutoff == [i for i, t in enumerate(totals) if t > 1024]
    data = scan.to_dict()
    for key in ("samples", "vision_tokens", "total_tokens", "over_cutoff", "missing_images", "corrupt_images"):
        assert key in data
    assert data["samples"] == 8
    assert set(data["vision_tokens"]) >= {"p50", "p90", "p99", "max"}
    assert data["vision_tokens"]["max"] == max(scan.vision_tokens)
    assert data["total_tokens"]["p50"] == percentile_of(totals, 50)


def test_scan_text_tokens_approximation_and_tokenizer(media, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    data_dir, _ = media
    path, records = _dataset(data_dir)
    approx = scan_dataset(path, QWEN)
    assert approx.text_tokens_method.startswith("approximate")
    # sample 2: "Be brief." (9 chars), "Hi" (2), "Hello" (5) -> ceil(9/3.5) + 1 + 2, plus the template
    assert approx.text_tokens[2] == 3 + 1 + 2 + 3 * TEMPLATE_TOKENS_PER_MESSAGE

    vocab = {"[UNK]": 0, "A": 1, "photo": 2, ".": 3, "Text": 4, "only": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    exact = scan_dataset(path, QWEN, tokenizer=model_dir)
    assert exact.text_tokens_method == f"tokenizer {model_dir / 'tokenizer.json'}"
    samples = read_dataset(path)
    for sample, count in zip(samples, exact.text_tokens):
        texts = [m["content"].replace("<image>", "") for m in sample.messages]
        expected = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)
        assert count == expected + TEMPLATE_TOKENS_PER_MESSAGE * len(sample.messages)


def test_setup_for_dataset_longest_and_percentile(media):
    data_dir, sizes = media
    path, _ = _dataset(data_dir)
    scan = scan_dataset(path, QWEN, cutoff_len=600)
    setup = make_setup(QWEN, images=[])
    longest, warns = setup_for_dataset(setup, scan)
    index = max(range(scan.samples), key=lambda i: scan.total_tokens[i])
    assert longest.seq_len == scan.total_tokens[index] and longest.images == scan.image_sizes[index]
    assert longest.vision_tokens_per_sample == scan.vision_tokens[index]
    assert any("above cutoff_len 600" in w for w in warns)
    p50, warns = setup_for_dataset(setup, scan, percentile=50)
    assert p50.seq_len == percentile_of(scan.total_tokens, 50)
    assert any("planning for the p50 sample" in w for w in warns)
    with pytest.raises(VlplanError, match="percentile must be in"):
        setup_for_dataset(setup, scan, percentile=0)
    with pytest.raises(VlplanError, match="other image_max_pixels"):
        setup_for_dataset(make_setup(QWEN, images=[], image_max_pixels=1000, image_min_pixels=256), scan)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert [percentile_of(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile_of([7], 1) == 7 and percentile_of([1, 2, 3, 4], 50) == 2


# Formats --------------------------------------------------------------------------------------------------------------
def test_read_sharegpt_alpaca_jsonl_and_media_dir(media, tmp_path):
    data_dir, _ = media
    lines = [
        {"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"},
                           {"from": "observation", "value": "tool out"}, {"from": "function_call", "value": "{}"}],
         "system": "sys", "images": "imgs/tiny.png"},
        {"instruction": "i", "input": "x", "output": "o", "history": [["h1", "r1"]], "system": "s"},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]},
                      {"role": "assistant", "content": "it"}], "images": [{"path": "imgs/photo.jpg"}]},
    ]
    path = tmp_path / "elsewhere" / "data.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    samples = read_dataset(path, media_dir=data_dir)
    assert [s.index for s in samples] == [0, 1, 2] and all(isinstance(s, Sample) for s in samples)
    assert samples[0].messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "<image>q"},
                                   {"role": "assistant", "content": "a"}, {"role": "user", "content": "tool out"},
                                   {"role": "assistant", "content": "{}"}]
    assert samples[0].images == [str(data_dir / "imgs" / "tiny.png")]
    assert samples[1].messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "h1"},
                                   {"role": "assistant", "content": "r1"}, {"role": "user", "content": "i\nx"},
                                   {"role": "assistant", "content": "o"}]
    assert samples[2].messages[0]["content"] == "<image>what"
    assert samples[2].image_refs == ["imgs/photo.jpg"]
    # without media_dir the images resolve against the data file's folder, where they are not: reported missing
    scan = scan_dataset(path, QWEN)
    assert scan.missing_images == ["imgs/photo.jpg", "imgs/tiny.png"]


def test_dataset_info_columns_tags_and_names(media):
    data_dir, sizes = media
    records = [{"dialog": [{"speaker": "me", "text": "<image>hi"}, {"speaker": "bot", "text": "yo"}],
                "pics": ["imgs/gray.jpg"]}]
    (data_dir / "custom.json").write_text(json.dumps(records))
    info = {"custom_demo": {"file_name": "custom.json", "formatting": "sharegpt",
                            "columns": {"messages": "dialog", "images": "pics"},
                            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me",
                                     "assistant_tag": "bot"}}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    by_file = read_dataset(data_dir / "custom.json", dataset_info=data_dir / "dataset_info.json")
    by_name = read_dataset("custom_demo", dataset_info=data_dir / "dataset_info.json")
    assert by_file == by_name
    assert by_name[0].messages == [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]
    assert by_name[0].images == [str(data_dir / "imgs" / "gray.jpg")]
    scan = scan_dataset("custom_demo", QWEN, dataset_info=data_dir / "dataset_info.json")
    assert scan.vision_tokens == [_tokens(QWEN, sizes["gray.jpg"])[0]]
    with pytest.raises(VlplanError, match="no entry with file_name other.json"):
        read_dataset(data_dir / "other.json", dataset_info=info)


@pytest.mark.parametrize("content, message", [
    ('[{"messages": [{"role": "user", "content": "a"}]}, ]', r"not valid JSON .*line 1"),
    ('{"messages": []}\n{"messages": [}\n', "line 2 is not valid JSON"),
    ('[1, 2]', "record 0 is a int, not an object"),
    ('[{"text": "hello"}]', "neither messages/conversations"),
    ('[{"messages": [{"role": "robot", "content": "a"}]}]', "unknown role 'robot'"),
    ('[{"messages": "hello"}]', "must be a list of messages"),
    ('[{"messages": [], "images": [42]}]', "must hold file paths"),
    ('   ', "is empty"),
])
def test_malformed_datasets(content, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(VlplanError, match=message):
        read_dataset(path)


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(VlplanError, match="does not exist"):
        read_dataset(tmp_path / "nope.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(VlplanError, match="has no samples"):
        scan_dataset(tmp_path / "empty.json", QWEN)
