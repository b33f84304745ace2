"""`vlplan tables`: every row is `vlplan estimate` of the setup it states (peak, largest micro-batch, fewest GPUs),
the formats parse back, bad input is one line, and the committed tables are what the code computes."""

import csv
import io
import json
import re
import shutil
from dataclasses import replace
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner
from vlplan.planner.errors import VlplanError
from vlplan.planner.hardware import find_gpu
from vlplan.planner.memory.estimate import estimate
from vlplan.tables.compute import (
    GPU_COUNTS,
    GPUS_PER_NODE,
    MAX_MICRO_BATCH,
    Conditions,
    row_setup,
)
from vlplan.tables.formats import CSV_COLUMNS, record, render
from vlplan.tables.generate import check_table
from vlplan.tables.output import is_generated
from vlplan.tables.presets import COMMITTED_DIR, preset
from vlplan.tables.spec import Table, TableSpec

from vlplan.cli.main import app

runner = CliRunner()
# fp16-only t4 next to bf16 GPUs of both cuBLAS workspace sizes (Hopper and not)
SAMPLE = TableSpec(models=("qwen2-vl-2b", "llava-1.5-7b"), methods=("full", "freeze", "lora", "qlora"),
                   gpus=("t4-16g", "rtx4090-24g", "a100-80g", "h100-80g"), seq_lens=(2048,),
                   image_sizes=((448, 448),))


def run(*args):
    return runner.invoke(app, ["tables", *args])


def size_of(row):
    return None if row.image_size == "-" else tuple(int(v) for v in row.image_size.split("x"))


def budget(row, conditions):
    return int(find_gpu(row.gpu).memory_bytes * (1 - conditions.margin))


def strategy_fields(name):
    """Row.strategy text -> (zero, offload)."""
    if name in ("single GPU", "DDP"):
        return 0, "none"
    zero = int(name.split()[0].removeprefix("ZeRO-"))
    offload = "optimizer" if name.endswith("offload optimizer") else "all" if name.endswith("offload all") else "none"
    return zero, offload


def on_gpus(setup, count, zero=0, offload="none"):
    per_node = min(count, GPUS_PER_NODE)
    return replace(setup, num_gpus=per_node, num_nodes=count // per_node, zero=zero, offload=offload)


@pytest.fixture(scope="module")
def sample_rows():
    return SAMPLE.rows(workers=1)


@pytest.fixture(scope="module")
def sample_table():
    return Table(stem="tables", parts=(SAMPLE,), command=SAMPLE.command())


def test_rows_are_the_estimates_of_their_setups(sample_rows):
    conditions = SAMPLE.conditions
    assert len(sample_rows) == SAMPLE.row_count == 32
    for row in sample_rows:
        setup = row_setup(row.model, row.method, row.seq_len, size_of(row), find_gpu(row.gpu), conditions)
        assert setup.precision == ("fp16" if row.gpu == "t4-16g" else "bf16")
        limit = budget(row, conditions)
        first = estimate(setup)
        assert (row.peak_bytes, row.peak_phase, row.vision_tokens) == \
            (first.peak_bytes, first.peak_phase, setup.vision_tokens_per_sample)
        # largest micro-batch: it fits, one more does not (unless the search cap is reached)
        if row.max_micro_batch is None:
            assert first.peak_bytes > limit
        else:
            assert estimate(replace(setup, batch_size=row.max_micro_batch)).peak_bytes <= limit
            if row.max_micro_batch < MAX_MICRO_BATCH:
                assert estimate(replace(setup, batch_size=row.max_micro_batch + 1)).peak_bytes > limit
        # fewest GPUs: that count and strategy fit; no non-offloading strategy fits on fewer
        if row.fewest_gpus is not None:
            zero, offload = strategy_fields(row.strategy)
            assert offload == "none"
            assert estimate(on_gpus(setup, row.fewest_gpus, zero)).peak_bytes <= limit
            for count in (c for c in GPU_COUNTS if c < row.fewest_gpus):
                for stage in (0, 1, 2, 3):
                    try:
                        candidate = on_gpus(setup, count, stage)
                    except VlplanError:  # a combination the frameworks reject (QLoRA + ZeRO-3, ...)
                        continue
                    assert estimate(candidate).peak_bytes > limit, (row, count, stage)
        if row.fewest_gpus_offload is not None:
            zero, offload = strategy_fields(row.strategy_offload)
            candidate = on_gpus(setup, row.fewest_gpus_offload, zero, offload)
            assert offload != "none" and estimate(candidate).peak_bytes <= limit
            assert row.offload_host_ram_bytes == estimate(candidate).cpu_ram_bytes
            assert row.fewest_gpus is None or row.fewest_gpus_offload < row.fewest_gpus
    # the sample spans the outcomes: fits with room, fits only ZeRO-sharded, only with offload
    assert {r.max_micro_batch for r in sample_rows} >= {None, MAX_MICRO_BATCH}
    assert any(r.strategy and r.strategy.startswith("ZeRO") for r in sample_rows)
    assert any(r.fewest_gpus_offload for r in sample_rows)


@pytest.mark.parametrize("model,method,gpu", [("qwen2-vl-2b", "full", "a100-80g"), ("llava-1.5-7b", "qlora", "t4-16g"),
                                              ("llava-1.5-7b", "lora", "h100-80g")])
def test_rows_equal_vlplan_estimate_cli(sample_rows, model, method, gpu):
    row = next(r for r in sample_rows if (r.model, r.method, r.gpu) == (model, method, gpu))
    args = ["estimate", "--model", model, "--method", method, "--seq-len", str(row.seq_len), "--image-size",
            row.image_size, "--gpu", gpu, "--json"] + (["--precision", "fp16"] if gpu == "t4-16g" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["peak_bytes"] == row.peak_bytes and data["tokens"]["vision_tokens_per_sample"] == row.vision_tokens


@pytest.mark.slow
def test_workers_give_the_same_rows():
    # conditions no other test uses, so neither run finds simulations cached by another
    spec = TableSpec(models=("qwen2-vl-2b",), methods=("lora", "qlora"), gpus=("rtx4090-24g", "a100-40g"),
                     seq_lens=(1024, 3072), image_sizes=((640, 480),), conditions=Conditions(lora_rank=24))
    progress = []
    parallel = spec.rows(workers=2, progress=progress.append)
    assert parallel == spec.rows(workers=1)
    assert sum(progress) == len(parallel) == spec.row_count


def test_invalid_rows_carry_a_note():
    spec = TableSpec(models=("qwen2-vl-2b",), methods=("lora",), gpus=("a100-80g",), seq_lens=(512, 4096),
                     image_sizes=((1920, 1080),), conditions=Conditions(image_max_pixels=1920 * 1080))
    short, long = spec.rows()
    assert short.peak_bytes is None and short.max_micro_batch is None and short.fewest_gpus is None
    assert "the images need 2693 tokens" in short.note and "\n" not in short.note
    assert long.peak_bytes is not None and long.note == "" and long.vision_tokens > 2048
    table = Table(stem="tables", parts=(spec,), command=spec.command())
    line = next(line for line in render("md", table, [short, long]).splitlines() if line.startswith("| qwen2-vl-2b"))
    assert "| - |" in line and "the images need 2693 tokens" in line


def test_csv_and_json_parse_back(sample_table, sample_rows):
    text = render("csv", sample_table, sample_rows)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any(sample_table.conditions.describe() in line for line in comments)
    parsed = list(csv.DictReader(io.StringIO("\n".join(l for l in text.splitlines() if not l.startswith("#")))))
    assert len(parsed) == len(sample_rows) and list(parsed[0]) == CSV_COLUMNS
    for line, row in zip(parsed, sample_rows):
        assert line["model"] == row.model and line["gpu"] == row.gpu
        assert line["peak_bytes"] == str(row.peak_bytes)
        assert line["max_micro_batch"] == ("" if row.max_micro_batch is None else str(row.max_micro_batch))
    data = json.loads(render("json", sample_table, sample_rows))
    assert data["conditions"]["description"] == sample_table.conditions.describe()
    assert data["conditions"]["margin"] == sample_table.conditions.margin
    assert data["rows"] == [record(r) for r in sample_rows]
    assert data["command"] == sample_table.command and data["max_micro_batch_searched"] == MAX_MICRO_BATCH


def test_markdown_table_structure(sample_table, sample_rows):
    lines = render("md", sample_table, sample_rows).splitlines()
    assert lines[0].startswith("<!-- generated by vlplan tables") and "-->" in lines[0]
    assert f"Conditions: {sample_table.conditions.describe()}." in lines
    table = [line for line in lines if line.startswith("|")]
    header, separator, body = table[0], table[1], table[2:]
    cells = header.count("|")
    assert all(line.count("|") == cells for line in table)
    assert all(re.fullmatch(r"-{3}:?", cell) for cell in separator.strip("|").split("|"))
    assert [c.strip() for c in header.strip("|").split("|")][6:10] == list(SAMPLE.gpus)
    assert len(body) == len(sample_rows) // len(SAMPLE.gpus)
    full = next(line for line in body if line.startswith("| qwen2-vl-2b | full |"))
    row = next(r for r in sample_rows if (r.model, r.method, r.gpu) == ("qwen2-vl-2b", "full", "a100-80g"))
    assert f"mb {row.max_micro_batch}" in full or f"x {row.strategy}" in full


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.caption, self._in = [], "", None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th", "caption"):
            self._in = tag
            if tag != "caption":
                self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th", "caption"):
            self._in = None

    def handle_data(self, data):
        if self._in == "caption":
            self.caption += data
        elif self._in:
            self.rows[-1][-1] += data


def test_html_parses_with_caption(sample_table, sample_rows):
    parser = _Cells()
    parser.feed(render("html", sample_table, sample_rows))
    assert sample_table.conditions.describe() in parser.caption
    assert len({len(r) for r in parser.rows}) == 1 and len(parser.rows) == 1 + len(sample_rows) // len(SAMPLE.gpus)
    assert parser.rows[0][0] == "model"


def test_json_to_stdout_and_files_written(tmp_path):
    args = ["--models", "qwen2-vl-2b", "--methods", "lora", "--gpus", "a100-80g"]
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["rows"]) == 1 and data["rows"][0]["model"] == "qwen2-vl-2b"
    assert data["command"].startswith("vlplan tables --models qwen2-vl-2b")
    result = run(*args, "--format", "md,csv,html,json", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables.csv", "tables.html", "tables.json", "tables.md"]
    assert all(is_generated(p) for p in tmp_path.iterdir())
    assert json.loads((tmp_path / "tables.json").read_text())["rows"] == data["rows"]
    # the command a file states gives the same file
    command = data["command"].split()[2:]
    assert run(*command, "--format", "csv").stdout == (tmp_path / "tables.csv").read_text()


def test_out_never_replaces_a_users_file(tmp_path):
    mine = tmp_path / "tables.md"
    mine.write_text("# my notes\n")
    result = run("--models", "qwen2-vl-2b", "--methods", "lora", "--gpus", "a100-80g", "--format", "md,csv", "--out",
                 str(tmp_path))
    assert result.exit_code == 2 and "was not written by vlplan tables" in result.stderr
    assert mine.read_text() == "# my notes\n" and not (tmp_path / "tables.csv").exists()


def test_check_flags_an_altered_or_missing_file(tmp_path):
    args = ["--models", "qwen2-vl-2b", "--methods", "lora", "--gpus", "a100-80g", "--format", "md,csv", "--out",
            str(tmp_path)]
    assert run(*args).exit_code == 0
    result = run(*args, "--check")
    assert result.exit_code == 0 and "up to date" in result.stdout
    (tmp_path / "tables.csv").write_text((tmp_path / "tables.csv").read_text().replace("a100-80g", "a100-40g"))
    (tmp_path / "tables.md").unlink()
    result = run(*args, "--check")
    err = result.stderr.strip()
    assert result.exit_code == 1 and "\n" not in err and "Traceback" not in result.output
    assert "tables.md, tables.csv" in err and "regenerate with `vlplan tables --models qwen2-vl-2b" in err


@pytest.fixture(scope="module")
def committed():
    chosen = preset("committed")
    return chosen, chosen.table.rows(workers=2)


@pytest.fixture
def computed_once(monkeypatch, committed):
    """The CLI's --check with the committed rows computed once for this module (Table.rows is tested above)."""
    chosen, rows = committed
    original = Table.rows
    monkeypatch.setattr(Table, "rows", lambda self, workers=1, progress=None:
                        rows if self == chosen.table else original(self, workers, progress))


@pytest.mark.slow
def test_committed_tables_are_up_to_date(computed_once, committed):
    chosen, rows = committed
    result = run("--check")
    assert result.exit_code == 0, result.output
    assert check_table(COMMITTED_DIR, chosen.table, rows, chosen.formats, chosen.plot) == []
    assert len(rows) == chosen.table.row_count and all(r.note == "" for r in rows)


@pytest.mark.slow
def test_check_fails_on_an_altered_committed_file(computed_once, tmp_path):
    copy = tmp_path / "generated"
    shutil.copytree(COMMITTED_DIR, copy)
    md = copy / "sizing.md"
    md.write_text(md.read_text().replace("| lora |", "| lora  |", 1))
    result = run("--check", "--out", str(copy))
    err = result.stderr.strip()
    assert result.exit_code == 1 and "\n" not in err and "Traceback" not in result.output
    assert f"stale tables in {copy}: sizing.md differ" in err and "vlplan tables --preset committed --out" in err
    (copy / "sizing_breakdown.png").unlink()
    assert "sizing_breakdown.png" in run("--check", "--out", str(copy)).stderr


def test_committed_preset_stays_small():
    # `vlplan tables --check` runs in this suite: ~0.1 s of simulation per row group on one core
    table = preset("committed").table
    groups = table.row_count // len(table.gpus)
    assert 100 <= groups <= 250


@pytest.mark.slow
def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    result = run("--models", "qwen2-vl-2b,llava-1.5-7b", "--methods", "lora,qlora", "--gpus", "a100-40g,h100-80g",
                 "--seq-lens", "2048,4096", "--image-sizes", "448x448,768x768", "--format", "csv", "--plot", "--out",
                 str(tmp_path))
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == sorted(f"tables_{n}.png" for n in ("max_micro_batch", "fewest_gpus", "peak_vs_image_pixels",
                                                       "peak_vs_seq_len", "breakdown"))
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000 and is_generated(tmp_path / name)
    # plots need two points per line: one sequence length and one image size give the heatmaps and the breakdown
    single = tmp_path / "single"
    result = run("--models", "qwen2-vl-2b", "--methods", "lora", "--gpus", "a100-40g", "--plot", "--out", str(single))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in single.glob("*.png")) == ["tables_breakdown.png", "tables_fewest_gpus.png",
                                                           "tables_max_micro_batch.png"]


BAD = [
    (["--models", "qwen2.5-vl-7x"], "unknown model.*did you mean"),
    (["--models", "qwen2-vl-2b", "--gpus", "h1000"], "unknown GPU"),
    (["--models", "qwen2-vl-2b", "--methods", "lora,sgd"], "--methods: 'sgd' is not one of"),
    (["--models", "qwen2-vl-2b", "--image-sizes", "448by448"],
     "--image-sizes: image size '448by448' is not WIDTHxHEIGHT"),
    (["--models", "qwen2-vl-2b", "--image-sizes", "0x448"], "positive"),
    (["--models", "qwen2-vl-2b", "--seq-lens", "2048,abc"], "--seq-lens: 'abc' is not a whole number"),
    (["--models", "qwen2-vl-2b", "--seq-lens", "0"], "--seq-lens: 0 is not a positive"),
    (["--models", "qwen2-vl-2b", "--seq-lens", ","], "--seq-lens is empty"),
    (["--models", "qwen2-vl-2b,qwen2-vl-2b"], "twice"),
    (["--models", "qwen2-vl-2b", "--margin", "1.5"], r"--margin must be in \[0, 1\)"),
    (["--models", "qwen2-vl-2b", "--attn", "flash"], "--attn 'flash' is not one of"),
    (["--models", "qwen2-vl-2b", "--quant-bits", "3"], "--quant-bits must be 4 or 8"),
    (["--models", "qwen2-vl-2b", "--images", "0", "--image-sizes", "448x448"], "--images 0"),
    (["--models", "qwen2-vl-2b", "--format", "xml"], "--format 'xml' is not one of"),
    (["--models", "qwen2-vl-2b", "--format", "md,csv"], "need --out"),
    (["--models", "qwen2-vl-2b", "--json", "--format", "csv"], "--json is --format json"),
    (["--models", "qwen2-vl-2b", "--plot"], "--plot writes PNG files: add --out"),
    (["--models", "qwen2-vl-2b", "--check"], "--check compares the files of a folder: add --out"),
    (["--models", "qwen2-vl-2b", "--workers", "0"], "--workers must be 1 or more"),
    (["--preset", "nightly"], "--preset 'nightly' is not one of"),
    (["--preset", "committed", "--seq-lens", "4096"], "--preset committed fixes the table; drop --seq-lens"),
    ([], "pass --models"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) or "no-args" for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output
    assert re.search(message, err), err


def committed_csv_rows():
    text = (COMMITTED_DIR / "sizing.csv").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return {(r["model"], r["method"], r["seq_len"], r["image_size"], r["gpu"]): r for r in csv.DictReader(lines)}


CITATION = re.compile(r"`([\w.\-]+)/(full|freeze|lora|qlora)/(\d+)/(\d+x\d+|-)/([\w\-]+)`")


def test_docs_cite_the_committed_rows():
    """docs/tables.md: every `model/method/seq/image/gpu` citation, the excerpt and the breakdown table are the numbers
    the committed tables (and the estimator) give."""
    from pathlib import Path

    rows = committed_csv_rows()
    text = (Path(__file__).resolve().parents[1] / "docs" / "tables.md").read_text()
    cited = 0
    for paragraph in text.split("\n\n"):
        paragraph = " ".join(paragraph.split("\n"))
        matches = list(CITATION.finditer(paragraph))
        for match, following in zip(matches, matches[1:] + [None]):
            row = rows[match.groups()]
            after = paragraph[match.end():following.start() if following else len(paragraph)]
            peak = re.search(r"(\d+\.\d\d) GiB", after)
            assert peak and peak.group(1) == f"{float(row['peak_gib']):.2f}", (match.group(0), after)
            batch = re.match(r"[^`|]*?mb (\d+)", after)
            if batch:
                assert batch.group(1) == row["max_micro_batch"], (match.group(0), after)
            gpus = re.match(r"[^`|]*?(\d+) x (ZeRO-\d|DDP)", after)
            if gpus:
                assert (gpus.group(1), gpus.group(2)) == (row["fewest_gpus"], row["strategy"]), match.group(0)
            cited += 1
    assert cited >= 20

    def table_after(marker):
        """The body cells of the markdown table right after `marker` (header and separator skipped)."""
        lines = text[text.index(marker):].splitlines()[3:]
        body = lines[:next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]
        return [[c.strip().strip("*`") for c in line.strip("|").split("|")] for line in body]

    methods = ("full", "freeze", "lora", "qlora")
    excerpt = table_after("<!-- excerpt: seq=2048 image=768x768 gpu=h100-80g -->")
    assert len(excerpt) == len(preset("committed").table.models)
    for model, *peaks in excerpt:
        assert peaks == [f"{float(rows[(model, m, '2048', '768x768', 'h100-80g')]['peak_gib']):.2f}" for m in methods]
    breakdown = table_after("<!-- breakdown: model=qwen2.5-vl-7b seq=2048 image=768x768 gpu=h100-80g -->")
    conditions = preset("committed").table.conditions
    results = {m: estimate(row_setup("qwen2.5-vl-7b", m, 2048, (768, 768), find_gpu("h100-80g"), conditions))
               for m in methods}
    for term, *cells in breakdown:
        for method, cell in zip(methods, cells):
            value = results[method].peak_bytes if term == "peak" else results[method].breakdown_bytes.get(term, 0)
            assert cell == (f"{value / 2**30:.2f}" if value >= 0.005 * 2**30 else "-"), (term, method)
    shown = {term for term, *_ in breakdown}
    assert all(term in shown for r in results.values() for term, v in r.breakdown_bytes.items() if v >= 0.005 * 2**30)


@pytest.mark.parametrize("model,method,seq_len,gpu", [("qwen2.5-vl-7b", "lora", 2048, "rtx4090-24g"),
                                                      ("internvl3-8b", "full", 4096, "h100-80g"),
                                                      ("llama-3.2-11b-vision", "qlora", 8192, "a100-40g")])
def test_committed_768_rows_are_default_estimates(model, method, seq_len, gpu):
    """The committed tables raise image_max_pixels to 1920x1080; rows with 768x768 images are what `vlplan estimate`
    gives with LLaMA-Factory's default cap (docs/tables.md says so)."""
    row = committed_csv_rows()[(model, method, str(seq_len), "768x768", gpu)]
    setup = row_setup(model, method, seq_len, (768, 768), find_gpu(gpu), Conditions())
    assert int(row["peak_bytes"]) == estimate(setup).peak_bytes
