"""Optimizer-state shapes and stepping order of the estimator's parameters against the transformers classes (on the
meta device): Adafactor factors every parameter of 2 or more dims (convolution kernels, 3-D expert weights, class
tokens and position tables included) into row and column states, and steps parameters in `named_parameters` order,
so its transient `update` of one parameter overlaps the next one's (tests/test_accuracy_*.py trace both)."""

import itertools

import pytest

from vlplan.planner.memory.families import base_layer_counts, layer_counts, model_for, spec_with_layers
from vlplan.planner.memory.sim import Engine
from vlplan.planner.memory.step import _matrix_shape
from vlplan.planner.modules import component_of
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

MODELS = ["qwen2-vl-2b", "qwen2.5-vl-3b", "qwen3-vl-4b", "qwen3-vl-30b-a3b", "llava-1.5-7b", "llava-v1.6-mistral-7b",
          "pixtral-12b", "internvl3-1b", "gemma-3-4b", "paligemma2-3b", "idefics3-8b", "llama-3.2-11b-vision"]


def adafactor_state_elements(shape: tuple[int, ...]) -> int:
    """transformers Adafactor: exp_avg_sq_row (shape[:-1]) + exp_avg_sq_col (shape[:-2] + shape[-1:]), or a full
    exp_avg_sq for vectors."""
    numel = 1
    for size in shape:
        numel *= size
    return numel // shape[-1] + numel // shape[-2] if len(shape) >= 2 else numel


@pytest.mark.parametrize("name", MODELS)
def test_adafactor_states_and_order_match_the_transformers_model(name):
    torch = pytest.importorskip("torch")
    from vlplan.profiler import build

    spec = resolve(name)
    setup = make_setup(spec, method="full", train_vision=True, train_projector=True, optimizer="adafactor",
                       gradient_checkpointing=False, seq_len=16384)
    counts = base_layer_counts(setup, layer_counts(spec))
    model = model_for(spec.family)(Engine(), setup, counts)
    ours = model.optimizer_order([p for p in model.e.params if p.trainable])
    with torch.device("meta"):
        hf = build.prepare_model(build.create_model(setup, spec_with_layers(spec, counts)), setup)
    theirs = [(n, p) for n, p in hf.named_parameters() if p.requires_grad]

    def states(p) -> int:
        rows, cols = _matrix_shape(p)
        return rows + cols if cols else p.numel

    assert sorted((p.numel, states(p)) for p in ours) == \
        sorted((p.numel(), adafactor_state_elements(tuple(p.shape))) for _, p in theirs)
    runs = [(component, len(list(group))) for component, group in
            itertools.groupby(component_of(spec.family, n) for n, _ in theirs)]
    assert [(c, len(list(g))) for c, g in itertools.groupby(p.component for p in ours)] == runs, name
    # the largest parameters (embeddings, lm_head, experts) are stepped in the same order
    large = max(p.numel for p in ours) // 4
    assert [p.numel for p in ours if p.numel >= large] == [p.numel() for _, p in theirs if p.numel() >= large]
