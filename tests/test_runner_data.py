"""runner/data.py: LLaMA-Factory datasets -> batches, held to the processors and LLaMA-Factory's rules."""

import json
import struct
import zlib

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlplan.planner.dataset import read_dataset  # noqa: E402
from vlplan.planner.errors import VlplanError  # noqa: E402
from vlplan.planner.registry import resolve  # noqa: E402
from vlplan.planner.setup import make_setup  # noqa: E402
from vlplan.planner.tokens import image_tokens, llamafactory_preresize  # noqa: E402
from vlplan.runner.data import IGNORE_INDEX, Collator, Encoder, SupervisedDataset, load_image  # noqa: E402
from vlplan.runner.processor import load_processor  # noqa: E402
from vlplan.runner.tiny import write_tiny_model  # noqa: E402

SIZES = [(90, 60), (64, 64), (120, 80), (56, 100)]


def write_dataset(root, count: int = 8, sizes=SIZES, sharegpt_tags: bool = False, answer: str = "A picture with {i} "
                  "shapes.") -> str:
    """A LLaMA-Factory dataset of `count` one-image samples (PNG and JPEG alternating) under `root`."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        name = f"images/{i}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(root / name)
        turns = [("user", "<image>What is in the image?"), ("assistant", answer.format(i=i))]
        if sharegpt_tags:
            records.append({"conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": v}
                                              for r, v in turns], "images": [name]})
        else:
            records.append({"messages": [{"role": r, "content": v} for r, v in turns], "images": [name]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def write_png_header(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (one tiny IDAT chunk): what a header-only reader sees."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("qwen2.5-vl", "llava"):
        write_tiny_model(family, root / family)
    return root


def _encoder(models, family, **setup_kw):
    spec = resolve(str(models / family))
    setup = make_setup(spec, method="lora", seq_len=512, image_size=(64, 64), precision="fp32", **setup_kw)
    return Encoder(load_processor(models / family, spec.family), setup), setup


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava"])
def test_labels_are_the_assistant_turns_only(models, family, tmp_path):
    encoder, _ = _encoder(models, family)
    Image.new("RGB", (90, 60)).save(tmp_path / "a.png")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A square."},
                {"role": "user", "content": "And the color?"}, {"role": "assistant", "content": "Red."}]
    encoded = encoder.encode(0, messages, [str(tmp_path / "a.png")])
    tokenizer = encoder.tokenizer
    labelled = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    eos = tokenizer.eos_token
    if family == "llava":
        assert labelled == f" A square. {eos} Red. {eos}"
    else:
        assert labelled == f"A square.{eos}\nRed.{eos}\n"
    # the label runs are exactly the assistant turns: two runs
    runs = sum(1 for i, label in enumerate(encoded.labels)
               if label != IGNORE_INDEX and (i == 0 or encoded.labels[i - 1] == IGNORE_INDEX))
    assert runs == 2
    # the image's tokens: as many as the planner's rule after LLaMA-Factory's pre-resize, none labelled
    image_id = encoder.processor.image_token_id
    positions = [i for i, t in enumerate(encoded.input_ids) if t == image_id]
    assert len(positions) == image_tokens(encoder.setup.model, 90, 60).llm_tokens
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # one contiguous run
    assert all(encoded.labels[i] == IGNORE_INDEX for i in positions)


def test_images_get_llamafactory_preresize(models, tmp_path):
    encoder, setup = _encoder(models, "qwen2.5-vl", image_max_pixels=128 * 128)
    Image.new("RGB", (1000, 500)).save(tmp_path / "big.png")
    assert load_image(str(tmp_path / "big.png"), setup).size == llamafactory_preresize(1000, 500, 128 * 128, 32 * 32)
    Image.new("L", (300, 20)).save(tmp_path / "thin.png")
    thin = load_image(str(tmp_path / "thin.png"), setup)
    assert thin.size == (300, 28) and thin.mode == "RGB"  # Qwen plugin: 28 px minimum side


def test_over_cutoff_samples_are_dropped_never_truncated(models, tmp_path):
    data = write_dataset(tmp_path, count=4, sizes=[(64, 64), (64, 64), (640, 640), (64, 64)])
    spec = resolve(str(models / "qwen2.5-vl"))
    setup = make_setup(spec, method="lora", seq_len=512, image_size=(64, 64), precision="fp32")
    processor = load_processor(models / "qwen2.5-vl", spec.family)
    full = SupervisedDataset(read_dataset(data), processor, setup, cutoff_len=4096)
    lengths = [len(item.input_ids) for item in full.items]
    cutoff = sorted(lengths)[-2]  # the 640x640 sample alone is longer
    dataset = SupervisedDataset(read_dataset(data), processor, setup, cutoff_len=cutoff)
    assert dataset.stats.kept == 3 and dataset.stats.dropped == {f"longer than the cutoff ({cutoff} tokens)": 1}
    assert [item.index for item in dataset.items] == [0, 1, 3]
    assert [len(item.input_ids) for item in dataset.items] == [lengths[i] for i in (0, 1, 3)]  # untouched
    with pytest.raises(VlplanError, match="no sample left to train on"):
        SupervisedDataset(read_dataset(data), processor, setup, cutoff_len=10)


def test_placeholder_count_must_match_images(models, tmp_path):
    encoder, _ = _encoder(models, "llava")
    Image.new("RGB", (90, 60)).save(tmp_path / "a.png")
    with pytest.raises(VlplanError, match="sample 3: 1 images but 2 <image> placeholders"):
        encoder.encode(3, [{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "x"}],
                       [str(tmp_path / "a.png")])


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava"])
def test_collator_pads_to_the_longest(models, family, tmp_path):
    data = write_dataset(tmp_path, count=2, sizes=[(64, 64), (120, 80)], sharegpt_tags=True)
    spec = resolve(str(models / family))
    setup = make_setup(spec, method="lora", seq_len=512, image_size=(64, 64), precision="fp32")
    processor = load_processor(models / family, spec.family)
    dataset = SupervisedDataset(read_dataset(data), processor, setup, cutoff_len=512)
    features = [dataset[0], dataset[1]]
    batch = Collator(processor.tokenizer.pad_token_id)(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert batch["attention_mask"][short].sum() == min(lengths)
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, min(lengths):] == processor.tokenizer.pad_token_id).all()
    expected = processor.image_processor(images=[load_image(dataset.items[i].images[0], setup) for i in (0, 1)],
                                         return_tensors="pt")
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    if family == "qwen2.5-vl":
        assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
        assert (batch["mm_token_type_ids"] == 1).sum() == (batch["input_ids"] == processor.image_token_id).sum()


def test_a_sample_without_an_assistant_turn_is_dropped(models, tmp_path):
    """LLaMA-Factory drops a conversation without a response (data/processor/supervised.py "Dropped invalid
    example"); an empty message list used to crash the chat template with an IndexError."""
    from vlplan.planner.dataset import Sample

    encoder, setup = _encoder(models, "qwen2.5-vl")
    samples = [Sample(0, [], []), Sample(1, [{"role": "user", "content": "hi"}], []),
               Sample(2, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], [])]
    dataset = SupervisedDataset(samples, encoder.processor, setup, 512)
    assert dataset.stats.kept == 1 and dataset.stats.dropped == {"no assistant turn": 2}


def test_a_dataset_file_holding_one_object_is_refused(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    for text in (json.dumps(record), json.dumps(record, indent=2), json.dumps({"data": [record]})):
        (tmp_path / "object.json").write_text(text)
        with pytest.raises(VlplanError, match="object.json holds one JSON object, not a list of samples"):
            read_dataset(tmp_path / "object.json")
    (tmp_path / "one.jsonl").write_text(json.dumps(record))  # JSON lines: one record is one sample
    assert len(read_dataset(tmp_path / "one.jsonl")) == 1


def test_an_image_over_pillows_limit_is_one_line(models, tmp_path):
    write_png_header(tmp_path / "bomb.png", 20000, 20000)
    _, setup = _encoder(models, "qwen2.5-vl")
    with pytest.raises(VlplanError, match="cannot read image .*bomb.png: Image size .* exceeds limit"):
        load_image(str(tmp_path / "bomb.png"), setup)
