"""`vlplan run` probes the heaviest micro-batch first (runner/probe.py): one real step on it before training, then
the model, optimizer and random state put back, so the run's losses are those of a run without the probe."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import torch  # noqa: E402
from test_runner_data import write_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlplan.cli.main import app  # noqa: E402
from vlplan.planner.heaviest import SampleLoad, heaviest_samples  # noqa: E402
from vlplan.planner.registry import resolve  # noqa: E402
from vlplan.planner.setup import make_setup  # noqa: E402
from vlplan.runner import probe as probe_module  # noqa: E402
from vlplan.runner.tiny import write_tiny_model  # noqa: E402

runner = CliRunner()
# one 448x336 image (192 vision tokens in the tiny Qwen2.5-VL) among 48-64 px ones (4-6 tokens): sample #2
SIZES = [(64, 64), (56, 48), (448, 336), (64, 64), (48, 64), (60, 60)]
LARGE = 2
FAST = ["--seq-len", "1024", "--precision", "fp32", "--batch-size", "2", "--learning-rate", "1e-3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    write_tiny_model("qwen2.5-vl", root / "qwen")
    return {"model": str(root / "qwen"), "data": write_dataset(root / "data", count=len(SIZES), sizes=SIZES)}


def run(env, out, *args):
    result = runner.invoke(app, ["run", "--model", env["model"], "--dataset", env["data"], "--output-dir", str(out),
                                 *FAST, *map(str, args)])
    return result


def record_of(out):
    return json.loads((out / "vlplan_run.json").read_text())


@pytest.mark.slow
def test_the_large_image_is_probed_first_and_the_run_is_unchanged(env, tmp_path):
    """The probe names the large image's sample and its measured peak; a run with the probe (and a run resumed with
    it, whose optimizer already holds state) has exactly the losses of a run without it."""
    plain, probed = tmp_path / "plain", tmp_path / "probed"
    assert run(env, plain, "--max-steps", 2, "--no-probe").exit_code == 0
    assert record_of(plain)["probe"] is None
    result = run(env, probed, "--max-steps", 1)
    assert result.exit_code == 0, result.output
    probe = record_of(probed)["probe"]
    assert probe["status"] == "done" and probe["samples"][0] == LARGE and len(probe["samples"]) == 2
    assert probe["images"][0] == ["448x336"] and probe["tokens"][0] == max(probe["tokens"])
    assert probe["steps"] == 2  # a fresh optimizer: a second step runs with Adam's states allocated
    assert probe["device"] == "cpu" and probe["live_tensor_peak_bytes"] > 0
    # the peak holds the model's weights and more: the tracker saw the step's tensors
    weights = sum(p.numel() * 4 for p in _model_params(env["model"]))
    assert probe["live_tensor_peak_bytes"] > weights
    assert probe["estimate_allocated_peak_bytes"] > 0 and "relative_error_allocated" in probe
    assert "heaviest micro-batch probed first: sample(s) #2" in result.stdout
    # resume to step 2: the probe runs again (one step: the optimizer holds the checkpoint's state)
    result = run(env, probed, "--max-steps", 2, "--resume")
    assert result.exit_code == 0, result.output
    resumed = record_of(probed)
    assert resumed["probe"]["steps"] == 1 and resumed["probe"]["samples"][0] == LARGE
    # the first real step's loss (and the resumed step's) are those of the run without the probe, exactly
    assert [e["loss"] for e in resumed["losses"]] == [e["loss"] for e in record_of(plain)["losses"]]
    assert [e["grad_norm"] for e in resumed["losses"]] == [e["grad_norm"] for e in record_of(plain)["losses"]]


def _model_params(path):
    import transformers

    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).parameters()


@pytest.mark.slow
def test_an_out_of_memory_error_in_the_probe_is_reported_at_step_0(env, tmp_path, monkeypatch):
    def out_of_memory(self, trainer, batch, tracker):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(probe_module.Probe, "_step", out_of_memory)
    out = tmp_path / "out"
    result = run(env, out, "--max-steps", 2)
    assert result.exit_code == 3, result.output
    record = record_of(out)
    assert record["status"] == "oom" and record["steps"] == 0 and record["losses"] == []
    assert record["probe"]["status"] == "oom" and record["probe"]["samples"][0] == LARGE
    assert record["oom"]["probe"] is True
    assert record["oom"]["message"].startswith("the heaviest-batch probe at step 0 (sample(s) #2, #")
    assert record["oom"]["next_settings"]["batch_size"] == 1  # the existing advice: half the micro-batch


def test_heaviest_samples_rank_by_the_estimate():
    """With the vision tower trained, a sample with one large image outweighs a longer text-only one (a ranking by
    tokens would pick the text); the ranking is the estimate's, sample by sample."""
    from dataclasses import replace

    from vlplan.planner.memory.estimate import estimate

    setup = make_setup(resolve("qwen2.5-vl-7b"), seq_len=4096, image_size=(448, 448), train_vision=True,
                       image_max_pixels=4 * 1024 * 1024)
    loads = [SampleLoad(0, 3000, 0, ()), SampleLoad(1, 2710, 2704, ((1456, 1456),)),
             SampleLoad(2, 400, 256, ((448, 448),)), SampleLoad(3, 100, 0, ())]
    ranked = heaviest_samples(setup, loads, 2)
    assert [r.load.index for r in ranked] == [1, 0]
    for r in ranked:
        alone = replace(setup, images=r.load.images, seq_len=r.load.tokens, batch_size=1)
        assert r.peak_bytes == estimate(alone).peak_bytes
    assert [r.load.index for r in heaviest_samples(setup, loads, 9)] == [1, 0, 2, 3]


def test_samples_are_ranked_by_tokens_when_the_estimate_fails(tmp_path, monkeypatch):
    """A model the estimator cannot price is still probed: its samples are ranked by tokens, then vision tokens, and
    the record says so; the loads carry each sample's exact tokens, image tokens and image headers."""
    from types import SimpleNamespace

    from test_runner_data import write_png_header

    write_png_header(tmp_path / "big.png", 2000, 1000)
    image = str(tmp_path / "big.png")
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: 7)
    items = [SimpleNamespace(index=10, input_ids=[1, 2, 3, 4, 5], images=[]),
             SimpleNamespace(index=11, input_ids=[1, 7, 7, 7, 2], images=[image]),
             SimpleNamespace(index=12, input_ids=[1, 2], images=[])]
    dataset = _Sized(SimpleNamespace(tokenizer=tokenizer, image_token="<img>"), items)
    loads = probe_module.dataset_loads(dataset)
    assert [(s.index, s.tokens, s.vision_tokens, s.images) for s in loads] == [
        (0, 5, 0, ()), (1, 5, 3, ((2000, 1000),)), (2, 2, 0, ())]

    def fails(*args, **kwargs):
        raise NotImplementedError("no memory model for this family")

    monkeypatch.setattr(probe_module, "heaviest_samples", fails)
    setup = SimpleNamespace(batch_size=2)
    probe = probe_module.Probe(setup, dataset, None, None)
    ranked, ranked_by = probe.choose()
    assert [r.load.index for r in ranked] == [1, 0] and ranked_by.startswith("tokens, then vision tokens (no estimate")


class _Sized:
    def __init__(self, encoder, items):
        self.encoder, self.items = encoder, items

    def __len__(self):
        return len(self.items)
