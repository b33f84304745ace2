"""`vlplan tiny-model`: directories transformers loads offline, with the family's tokens, template and processor."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlplan.cli.main import app  # noqa: E402
from vlplan.planner.registry import resolve  # noqa: E402
from vlplan.planner.tokens import image_tokens  # noqa: E402
from vlplan.runner.processor import load_processor  # noqa: E402

runner = CliRunner()
FAMILIES = ["qwen2.5-vl", "qwen2-vl", "llava"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for family in FAMILIES:
        result = runner.invoke(app, ["tiny-model", "--family", family, str(root / family), "--json"])
        assert result.exit_code == 0, result.output
        dirs[family] = root / family
        assert json.loads(result.stdout)["family"] == family
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_it_offline(tiny_dirs, family):
    path = tiny_dirs[family]
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    config = model.config
    assert type(model).__name__ == resolve(str(path)).hf_class
    assert image_processor.__class__.__name__.endswith("Pil")  # no torchvision needed
    if family.startswith("qwen"):
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                              "<|video_pad|>", "<|im_start|>", "<|im_end|>")}
        assert ids["<|image_pad|>"] == config.image_token_id
        assert ids["<|vision_start|>"] == config.vision_start_token_id
        assert ids["<|vision_end|>"] == config.vision_end_token_id
        assert ids["<|video_pad|>"] == config.video_token_id
        assert tokenizer.eos_token == "<|im_end|>"
    else:
        assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
        assert tokenizer.bos_token == "<s>" and tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    assert len(tokenizer) <= config.text_config.vocab_size
    assert all(t < config.text_config.vocab_size for t in tokenizer("What is in the image?")["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_processor_and_planner_agree_and_the_model_runs(tiny_dirs, family):
    """The processor (the family's own class) expands an image into as many tokens as the planner's rule says, and
    the model takes the processor's output."""
    from PIL import Image

    path = tiny_dirs[family]
    spec = resolve(str(path))
    processor = load_processor(path, spec.family)
    image = Image.new("RGB", (90, 60), (200, 30, 30))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    count = int((batch["input_ids"] == processor.image_token_id).sum())
    assert count == image_tokens(spec, 90, 60).llm_tokens
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)


@pytest.mark.slow
def test_spec_read_back_is_tiny(tiny_dirs):
    spec = resolve(str(tiny_dirs["qwen2.5-vl"]))
    assert (spec.family, spec.text.hidden_size, spec.text.num_layers, spec.vision.num_layers) == ("qwen2_5_vl", 256, 2,
                                                                                                 2)
    assert spec.processor.max_pixels == resolve("qwen2.5-vl-3b").processor.max_pixels


def test_refuses_a_non_empty_directory_and_unknown_families(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    result = runner.invoke(app, ["tiny-model", "--family", "llava", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path} exists and is not an empty directory; choose a "
                                                  "new path"]
    assert (tmp_path / "keep.txt").read_text() == "user data"
    result = runner.invoke(app, ["tiny-model", "--family", "gpt2", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--family 'gpt2' is not one of" in result.stderr
