"""`vlplan plan --maximize` (planner/maximize.py) and the plan against the data (planner/fit.py): the value found fits
and the next one up does not, over random setups; the data cost counts the images LLaMA-Factory's own pre-resize
shrinks; the LLaMA-Factory YAML carries the value; the samples LLaMA-Factory's truncation would crash on are listed."""

import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.dataset import ScanResult, scan_dataset
from vlplan.planner.errors import VlplanError
from vlplan.planner.fit import data_statement
from vlplan.planner.hardware import custom_gpu
from vlplan.planner.maximize import maximize
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup
from vlplan.planner.tokens import image_tokens

runner = CliRunner()
EXAMPLE = "examples/data/vlplan_demo.json"
sides = st.integers(min_value=32, max_value=4000)
# no shrinking: a failing example is printed as found (shrinking re-runs searches for minutes)
QUICK = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                 phases=[Phase.explicit, Phase.reuse, Phase.generate])


def _fits(setup, budget: int, **changes) -> bool:
    try:
        return estimate(replace(setup, **changes)).peak_bytes <= budget
    except VlplanError:  # refused (e.g. the images' tokens above the sequence): does not fit
        return False


@QUICK
@given(model=st.sampled_from(["qwen2-vl-2b", "qwen2.5-vl-3b", "llava-1.5-7b"]), text=st.integers(16, 2048),
       where=st.floats(min_value=-0.1, max_value=1.2), margin=st.floats(min_value=0, max_value=0.3),
       batch_size=st.integers(min_value=1, max_value=2), checkpointing=st.booleans(),
       images=st.lists(st.tuples(sides, sides), min_size=1, max_size=2), train_vision=st.booleans())
def test_the_largest_image_max_pixels_fits_and_the_next_does_not(model, text, where, margin, batch_size,
                                                                 checkpointing, images, train_vision):
    """The sequence holds the images at any cap (text + their uncapped tokens), and the GPU is sized so that the
    budget falls at `where` between the estimates with the smallest and with uncapped images: below them nothing
    fits, between them memory binds, above them the data does."""
    spec = resolve(model)
    uncapped = sum(t.llm_tokens + t.special_tokens for t in (image_tokens(spec, w, h, image_max_pixels=None)
                                                             for w, h in images))
    base = make_setup(spec, seq_len=text + uncapped, batch_size=batch_size, images=images, train_vision=train_vision,
                      gradient_checkpointing=checkpointing, image_max_pixels=1024 * 1024)
    low = estimate(replace(base, image_max_pixels=base.image_min_pixels)).peak_bytes
    high = estimate(replace(base, image_max_pixels=max(w * h for w, h in images))).peak_bytes
    budget_bytes = low + where * (high - low)
    setup = replace(base, gpu=custom_gpu(budget_bytes / (1 - margin) / 2**30))
    try:
        result = maximize(setup, "image-max-pixels", margin=margin)
    except VlplanError as err:
        assert "does not fit" in str(err)  # nothing fits: a one-line reason
        event("nothing fits")
        return
    event(f"bound: {result.bound}")
    budget = int(setup.gpu.memory_bytes * (1 - margin))
    value = result.value
    assert result.setup == replace(setup, image_max_pixels=value)
    assert _fits(setup, budget, image_max_pixels=value)
    if result.bound in ("memory", "refused"):
        assert not _fits(setup, budget, image_max_pixels=value + 1)
    else:  # the data needs no more: no image is resized at the value, so a larger one changes nothing
        assert result.bound == "data" and value >= max(w * h for w, h in images)
    # the live tensors grow with the cap; the caching allocator's replayed reserve need not (a block that fits a
    # cached segment at one size may need a new one at a smaller size), so a break the search reports must come
    # from the reserve: the replay-free floor of the pair grows
    from vlplan.planner.memory.estimate import peak_floor_bytes

    tried = sorted(result.estimated)
    for small, large in zip(tried, tried[1:]):
        if not result.estimated[small] and result.estimated[large]:
            assert peak_floor_bytes(replace(setup, image_max_pixels=small)) <= peak_floor_bytes(
                replace(setup, image_max_pixels=large)), (small, large)


@QUICK
@given(memory_gib=st.floats(min_value=8, max_value=24), sizes=st.lists(st.tuples(sides, sides), min_size=2,
                                                                        max_size=8),
       text=st.lists(st.integers(min_value=10, max_value=3000), min_size=8, max_size=8))
def test_with_a_dataset_the_resized_samples_are_llamafactorys(memory_gib, sizes, text):
    """Over a scanned dataset the answer fits with the data's longest sample and the next value up does not; the
    samples reported resized are those LLaMA-Factory's own `_preprocess_image` shrinks at the value."""
    preprocess_image = _llamafactory_preprocess_image()
    Image = pytest.importorskip("PIL.Image")
    spec = resolve("qwen2-vl-2b")
    setup = make_setup(spec, gpu=custom_gpu(memory_gib), train_vision=True, image_max_pixels=4096 * 4096, images=[])
    scan = _scan(spec, setup, [(s,) for s in sizes], text[:len(sizes)])
    try:
        result = maximize(setup, "image-max-pixels", scan=scan)
    except VlplanError as err:
        assert "does not fit" in str(err)
        event("nothing fits")
        return
    event(f"bound: {result.bound}")
    budget = int(setup.gpu.memory_bytes * (1 - 0.10))
    assert _fits(_longest_at(scan, setup, result.value), budget)
    if result.bound == "memory":
        assert not _fits(_longest_at(scan, setup, result.value + 1), budget)
    resized = [i for i, (w, h) in enumerate(sizes)
               if preprocess_image(None, Image.new("RGB", (w, h)), image_max_pixels=result.value,
                                   image_min_pixels=setup.image_min_pixels).size != (w, h)]
    cost = result.data_cost
    assert cost["samples_resized"] == len(resized) and cost["first_resized"] == resized[:5]
    if resized:
        assert 0 < cost["smallest_pixel_share"] < 1


def _llamafactory_preprocess_image():
    """LLaMA-Factory's own `MMPluginMixin._preprocess_image` (data/mm_plugin.py), taken from its source with ast:
    importing the module needs torchaudio."""
    import ast
    import importlib.util
    import textwrap
    from pathlib import Path

    spec = importlib.util.find_spec("llamafactory")
    if spec is None:
        pytest.skip("LLaMA-Factory is not installed")
    source = (Path(spec.origin).parent / "data" / "mm_plugin.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "_preprocess_image":
            code = textwrap.dedent(ast.get_source_segment(source, node))
            namespace: dict = {}
            exec(compile("import math\n" + code, "mm_plugin.py", "exec"), namespace)  # noqa: S102
            return namespace["_preprocess_image"]
    pytest.fail("LLaMA-Factory's mm_plugin.py has no _preprocess_image")


def _scan(spec, setup, image_sizes, text_tokens) -> ScanResult:
    counts = [[image_tokens(spec, w, h, image_max_pixels=setup.image_max_pixels,
                            image_min_pixels=setup.image_min_pixels) for w, h in sample] for sample in image_sizes]
    return ScanResult(path="mem", model=spec.name, text_tokens_method="given", image_max_pixels=setup.image_max_pixels,
                      image_min_pixels=setup.image_min_pixels, cutoff_len=setup.seq_len, text_tokens=list(text_tokens),
                      vision_tokens=[sum(t.llm_tokens for t in c) for c in counts],
                      special_tokens=[sum(t.special_tokens for t in c) for c in counts],
                      image_sizes=[tuple(s) for s in image_sizes], missing_images=[], corrupt_images={},
                      remote_images=[], placeholder_mismatches=[], videos=0)


def _longest_at(scan, setup, pixels):
    """The setup with the longest sample at the cap (ties: more image tokens, then the lower index)."""
    best = None
    for i, (text, sample) in enumerate(zip(scan.text_tokens, scan.image_sizes)):
        image = sum(t.llm_tokens + t.special_tokens for t in
                    (image_tokens(setup.model, w, h, image_max_pixels=pixels, image_min_pixels=setup.image_min_pixels)
                     for w, h in sample))
        key = (text + image, image)
        if best is None or key > best[0]:
            best = (key, i)
    (total, _), i = best
    return replace(setup, image_max_pixels=pixels, images=scan.image_sizes[i], seq_len=total)


def test_cutoff_len_and_micro_batch_are_the_boundary():
    setup = make_setup(resolve("qwen2.5-vl-7b"), gpu="a10g-24g", image_size=(1280, 720))
    budget = int(setup.gpu.memory_bytes * 0.9)
    result = maximize(setup, "cutoff-len")
    assert result.bound == "memory" and result.key == "cutoff_len"
    assert _fits(setup, budget, seq_len=result.value)
    assert not _fits(setup, budget, seq_len=result.value + 1)
    result = maximize(replace(setup, seq_len=1024), "micro-batch")
    assert _fits(setup, budget, seq_len=1024, batch_size=result.value)
    assert not _fits(setup, budget, seq_len=1024, batch_size=result.value + 1)


def test_cutoff_len_over_the_data_reports_the_samples_cut():
    spec = resolve("qwen2-vl-2b")
    setup = make_setup(spec, gpu=custom_gpu(12), train_vision=True, image_max_pixels=1024 * 1024, images=[])
    sizes = [((1024, 1024),), ((64, 64),), ((300, 200),), (), ((1000, 900),)]
    scan = _scan(spec, setup, sizes, [20000, 40, 30000, 9000, 50])
    result = maximize(setup, "cutoff-len", scan=scan)
    totals = [t + v + s for t, v, s in zip(scan.text_tokens, scan.vision_tokens, scan.special_tokens)]
    cut = [i for i, t in enumerate(totals) if t > result.value]
    assert result.bound == "memory" and cut
    assert result.data_cost["samples_cut"] == len(cut) and result.data_cost["first_cut"] == cut
    assert result.data_cost["share_cut"] == round(len(cut) / len(totals), 4)


def test_a_plan_needs_a_global_batch_unless_it_maximizes():
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "error: --global-batch-size is required (the samples per optimizer step over all GPUs), unless --maximize "
        "searches one setting with the others fixed"]
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--maximize", "micro-batch", "-g", "8"])
    assert result.exit_code == 2 and "drop one of them" in result.stderr


def test_video_frames_is_refused_in_one_line():
    setup = make_setup(resolve("qwen2.5-vl-7b"))
    with pytest.raises(VlplanError, match="video-frames is not built yet"):
        maximize(setup, "video-frames")
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--maximize", "video-frames"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "error: --maximize video-frames is not built yet (the estimate takes videos from --videos or --dataset, but "
        "plan does not search their frames); maximize image-max-pixels, cutoff-len or micro-batch, or estimate given "
        "--video-frames / --video-maxlen"]


def test_the_cli_exports_the_value_to_llamafactory_yaml(tmp_path):
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "lf.yaml"
    args = ["plan", "--model", "qwen2.5-vl-7b", "--gpu", "h100", "--image-size", "3000x2000", "--seq-len", "6000",
            "--maximize", "image-max-pixels", "--export-llamafactory", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    value = data["maximize"]["value"]
    assert data["settings"]["image_max_pixels"] == value
    assert yaml.safe_load(out.read_text())["image_max_pixels"] == value
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--gpu", "h100", "--maximize", "cutoff-len",
                                 "-g", "8", "--export-llamafactory", str(out), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert yaml.safe_load(out.read_text())["cutoff_len"] == data["maximize"]["value"] == data["settings"]["seq_len"]
    assert data["micro_batch_size"] * data["gradient_accumulation_steps"] == 8  # the rest planned at the value


def test_the_plan_states_the_worst_micro_batch_and_the_samples_that_would_crash(tmp_path):
    """A percentile plan's cutoff_len leaves the longest sample out: it is above the cutoff, it has images, so it is
    listed with the fix; the worst micro-batch names the heaviest samples."""
    spec = resolve("qwen2.5-vl-7b")
    setup = make_setup(spec, seq_len=300, image_size=(448, 448), batch_size=2)
    scan = scan_dataset(EXAMPLE, spec, cutoff_len=300)
    statement = data_statement(setup, scan)
    totals = scan.total_tokens
    above = [i for i, t in enumerate(totals) if t > 300]
    assert statement["above_cutoff"] == len(above) and statement["first_image_token_mismatch"] == above
    assert statement["share_above_cutoff"] == round(len(above) / len(totals), 4)
    assert statement["fix"][0] == f"cutoff_len {max(totals[i] for i in above)} (the longest of them)"
    assert any("Image features and image tokens do not match" in w and "#3" in w for w in statement["warnings"])
    assert [r["index"] for r in statement["worst_micro_batch"]][0] == scan.pick()
    assert len(statement["worst_micro_batch"]) == 2
    # the image_max_pixels fix makes them fit the cutoff
    pixels = int(statement["fix"][1].split()[-1])
    for i in above:
        tokens = scan.text_tokens[i] + sum(
            t.llm_tokens + t.special_tokens for t in (image_tokens(spec, w, h, image_max_pixels=pixels)
                                                      for w, h in scan.image_sizes[i]))
        assert tokens <= 300
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--dataset", EXAMPLE, "--percentile", "50",
                                 "-g", "4"])
    assert result.exit_code == 0, result.output
    assert "data: worst micro-batch planned for: sample(s) #" in result.stderr
    assert "LLaMA-Factory's truncation cuts into their image tokens" in result.stderr



def test_the_docs_worked_example_is_current(tmp_path):
    """docs/fit-the-data.md shows real output: its --maximize answer and fix are what vlplan computes now."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "fit-the-data.md").read_text()
    shown = int(re.search(r"largest image_max_pixels that fits: (\d+) \(memory bound\)", doc).group(1))
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--dataset", EXAMPLE, "--train-vision",
                                 "--gpu-memory-gib", "20", "--maximize", "image-max-pixels", "--export-llamafactory",
                                 str(tmp_path / "fit.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["maximize"]["value"] == shown
    fix = re.search(r"fix: cutoff_len (\d+) \(the longest of them\) or image_max_pixels (\d+)", doc).groups()
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--dataset", EXAMPLE, "--percentile", "50",
                                 "-g", "4", "--gpu", "a10g-24g", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    assert data["fix"][:2] == [f"cutoff_len {fix[0]} (the longest of them)", f"image_max_pixels {fix[1]}"]
