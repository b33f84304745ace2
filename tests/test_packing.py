"""Packing (planner/packing.py) against LLaMA-Factory's own PackedSupervisedDatasetProcessor on random sample
lengths: its `preprocess_dataset` runs on each group of examples (as `dataset.map(batched=True)` hands them), with
`_encode_data_example` standing in for the chat template (each sample's tokens carry its index, so the rows it
builds tell which samples they hold), and DataArguments' own `__post_init__` lowering cutoff_len."""

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llamafactory_modules import import_llamafactory
from vlplan.planner.packing import greedy_knapsack, pack

supervised = import_llamafactory("llamafactory.data.processor.supervised")
processor_utils = import_llamafactory("llamafactory.data.processor.processor_utils")
DataArguments = import_llamafactory("llamafactory.hparams.data_args").DataArguments

PAD = -1


def _llamafactory_rows(totals: list[int], cutoff_len: int, neat: bool, group: int) -> tuple[list, list]:
    args = DataArguments(cutoff_len=cutoff_len, packing=not neat, neat_packing=neat)
    processor = supervised.PackedSupervisedDatasetProcessor(
        template=None, tokenizer=SimpleNamespace(pad_token_id=PAD), processor=None, data_args=args)
    processor._encode_data_example = lambda prompt, response, **_: (
        [prompt[0]["index"]] * prompt[0]["length"], [prompt[0]["index"]] * prompt[0]["length"])
    rows, masks = [], []
    for start in range(0, len(totals), group):
        indices = range(start, min(start + group, len(totals)))
        examples = {"_prompt": [[{"index": i, "length": totals[i]}] for i in indices],
                    "_response": [[{}] for _ in indices], "_system": [None] * len(indices),
                    "_tools": [None] * len(indices), "_images": [None] * len(indices),
                    "_videos": [None] * len(indices), "_audios": [None] * len(indices)}
        out = processor.preprocess_dataset(examples)
        for ids, mask in zip(out["input_ids"], out["attention_mask"]):
            assert len(ids) == cutoff_len  # every row: the YAML's cutoff_len
            row, previous = [], None
            for token in ids:
                if token != PAD and token != previous:
                    row.append(token)
                previous = token
            rows.append(tuple(row))
            masks.append(mask)
    return rows, masks


@settings(max_examples=200, deadline=None)
@given(totals=st.lists(st.integers(1, 600), min_size=1, max_size=60), cutoff_len=st.integers(2, 700),
       neat=st.booleans(), group=st.sampled_from([7, 1000]))
def test_rows_equal_llamafactory(totals, cutoff_len, neat, group):
    rows, masks = _llamafactory_rows(totals, cutoff_len, neat, group)
    ours = pack(totals, cutoff_len, group=group)
    assert [tuple(row) for row in ours.rows] == rows
    kept = {i for row in rows for i in row}
    assert set(ours.dropped) == set(range(len(totals))) - kept
    if neat:  # each token's sample number, 0 on padding: what the collator turns into the block-diagonal mask
        for row, mask in zip(ours.rows, masks):
            assert max(mask) == len(row)


@settings(max_examples=200, deadline=None)
@given(numbers=st.lists(st.integers(1, 100), max_size=80), capacity=st.integers(100, 300))
def test_greedy_knapsack_equals_llamafactory(numbers, capacity):
    # (LLaMA-Factory drops the samples longer than the capacity before: a longer number would loop forever)
    assert greedy_knapsack(list(numbers), capacity) == processor_utils.greedy_knapsack(list(numbers), capacity)


def test_summary():
    packing = pack([100, 200, 300, 5000], 1024)
    assert packing.dropped == (3,) and packing.samples_per_row() == [3]
    assert packing.to_dict([100, 200, 300, 5000])["mean_fill"] == pytest.approx(600 / 1024, abs=1e-4)


def test_a_packed_dataset_plans_for_its_heaviest_row():
    """With packing, the planned row holds every image of the samples LLaMA-Factory packs together."""
    from vlplan.planner.dataset import ScanResult, setup_for_dataset
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup

    spec = resolve("qwen2.5-vl-7b")
    sizes = [((448, 448),), ((448, 448), (896, 896)), (), ((1344, 1344),), ()]
    vision = [256, 1280, 0, 2304, 0]
    text = [300, 200, 1500, 100, 4100]
    scan = ScanResult(path="data.json", model=spec.name, text_tokens_method="test", image_max_pixels=768 * 768,
                      image_min_pixels=32 * 32, cutoff_len=4096, text_tokens=text, vision_tokens=vision,
                      special_tokens=[2 * len(s) for s in sizes], image_sizes=sizes, missing_images=[],
                      corrupt_images={}, remote_images=[], placeholder_mismatches=[], videos=0)
    setup = make_setup(spec, packing=True, seq_len=4096)
    planned, warnings = setup_for_dataset(setup, scan)
    packing = pack(scan.total_tokens, 4096)
    row = max(packing.rows, key=lambda r: sum(vision[i] for i in r))
    assert len(row) > 1 and planned.seq_len == 4096
    assert sorted(planned.images) == sorted(size for i in row for size in sizes[i])
    assert [w for w in warnings if "1 sample longer than cutoff_len - 1" in w]  # sample #4


def test_cli_flags():
    import json

    from typer.testing import CliRunner

    from vlplan.cli.main import app

    result = CliRunner().invoke(app, ["estimate", "-m", "qwen2-vl-2b", "--neat-packing", "--cutoff-len", "4096",
                                      "--json"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    assert (settings["packing"], settings["neat_packing"], settings["seq_len"]) == (True, True, 4096)
