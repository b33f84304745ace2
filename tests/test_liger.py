"""Liger's fused linear cross-entropy (LLaMA-Factory `enable_liger_kernel`): the estimator against the tracer, which
runs LLaMA-Factory's own `apply_liger_kernel` with liger's autograd Functions emulated on the CPU
(profiler/liger_emulate.py); the Qwen2-VL/2.5-VL patch, which fails to import on the modelled versions (said, and
modelled as it applies where it imports); the flag, the warning where it is not modelled, and the LLaMA-Factory
round trip."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.coverage import setup_warnings
from vlplan.planner.memory import liger
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

from tiny import assert_phases_match, tiny_spec

SMALL = dict(seq_len=256, image_size=(112, 112), stack="llamafactory", liger_kernel=True)


@pytest.mark.parametrize("tokens, hidden, vocab, expected", [
    (4096 * 4, 4096, 32000, 2048),  # the example in fused_linear_cross_entropy_forward's comment
    (2048, 3584, 152064, 64),  # Qwen2.5-7B: inc_factor 43 -> ceil(2048 / 43) = 48 -> 64
    (100, 4096, 4096, 100),  # one chunk: never above BT
])
def test_chunk_size_follows_liger(tokens, hidden, vocab, expected):
    assert liger.chunk_size(tokens, hidden, vocab) == expected


def test_fused_loss_drops_the_logits_from_the_loss_phase():
    base = make_setup(resolve("llava-1.5-7b"), stack="llamafactory", seq_len=4096)
    plain, fused = estimate(base), estimate(make_setup(resolve("llava-1.5-7b"), stack="llamafactory", seq_len=4096,
                                                       liger_kernel=True))
    # without Liger the loss phase holds bf16 logits, their fp32 copy and log-softmax: 10 bytes per token x vocab
    saved = plain.phase_allocated_bytes["loss"] - fused.phase_allocated_bytes["loss"]
    assert saved > 8 * 4095 * 32064
    assert not setup_warnings(make_setup(resolve("llava-1.5-7b"), stack="llamafactory", liger_kernel=True))


@pytest.mark.parametrize("model, stack", [("paligemma2-3b", "llamafactory"), ("llava-1.5-7b", "vlplan")])
def test_not_modelled_liger_warns_and_keeps_the_estimate(model, stack):
    setup = make_setup(resolve(model), stack=stack, liger_kernel=True)
    assert any(w.startswith("liger_kernel = True: Liger kernels") for w in setup_warnings(setup))
    assert estimate(setup).peak_bytes == estimate(make_setup(resolve(model), stack=stack)).peak_bytes


@pytest.mark.parametrize("model", ["qwen2-vl-7b", "qwen2.5-vl-7b"])
def test_qwen_patch_is_modelled_and_says_it_fails_to_load_here(model):
    setup = make_setup(resolve(model), stack="llamafactory", seq_len=2048, liger_kernel=True)
    [warning] = [w for w in setup_warnings(setup) if "liger" in w]
    assert "ImportError" in warning and "liger-kernel 0.8.5" in warning and "transformers 5.23" in warning
    plain = estimate(make_setup(resolve(model), stack="llamafactory", seq_len=2048))
    fused = estimate(setup)
    # no logits: the loss phase drops bf16 logits, their fp32 copy and log-softmax (10 bytes x tokens x 152k vocab)
    assert plain.phase_allocated_bytes["loss"] - fused.phase_allocated_bytes["loss"] > 2 * 2047 * 152064
    assert {"rms_norm", "swiglu"} <= liger.swaps(setup)
    # `vlplan plan` does not switch on a lever that stops training from starting on the modelled versions
    from vlplan.planner.plan import memory_levers

    assert not any("Liger" in what for _, what in memory_levers(replace(setup, liger_kernel=False)))


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_patch_really_fails_with_the_installed_versions(model_type):
    """The oracle for `import_failure`: LLaMA-Factory's own apply_liger_kernel with the installed liger-kernel and
    transformers raises ImportError for the Qwen VL model types (and patches nothing first)."""
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")
    pytest.importorskip("llamafactory")
    import types

    from vlplan.profiler.build import llamafactory_checkpointing

    llamafactory_checkpointing()
    from llamafactory.model.model_utils.liger_kernel import apply_liger_kernel

    spec = resolve("qwen2-vl-7b" if model_type == "qwen2_vl" else "qwen2.5-vl-7b")
    module = __import__(f"transformers.models.{model_type}.modeling_{model_type}", fromlist=["x"])
    before = dict(vars(module))
    with pytest.raises(ImportError, match=liger.IMPORT_FAILURES[spec.family][1]):
        apply_liger_kernel(types.SimpleNamespace(model_type=model_type),
                           types.SimpleNamespace(enable_liger_kernel=True), is_trainable=True, require_logits=False)
    assert dict(vars(module)) == before
    assert liger.import_failure(make_setup(spec, stack="llamafactory", liger_kernel=True))


def test_fused_loss_gradient_meets_the_tied_embedding_in_place():
    """The oracle for the tied head: real torch (no dispatch mode active) adds the embedding's gradient into the one
    a Function computed in its forward and hands back (liger's fused loss saves `grad_weight.detach()` and returns
    it), in place, so the final `.grad` is that tensor's memory (input_buffer.cpp `accumulate`:
    `old_var.add_(var)` when the buffer holds the last reference); the tracer, whose dispatch mode makes the engine
    sum out of place, counts it so (profiler/memtrack.py `_undo_out_of_place`)."""
    torch = pytest.importorskip("torch")
    from vlplan.profiler.memtrack import MemoryTracker

    born: dict[str, int] = {}

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(w)
            born["grad_w"] = grad_w.data_ptr()
            ctx.save_for_backward(grad_x.detach(), grad_w.detach())
            return (x @ w.t()).sum()

        @staticmethod
        def backward(ctx, _):
            return ctx.saved_tensors

    def step(tracker=None):
        w = torch.nn.Parameter(torch.randn(4096, 64))
        ids = torch.randint(0, 4096, (32,))
        if tracker is not None:
            tracker.phase = "loss"
        loss = Fused.apply(torch.nn.functional.embedding(ids, w) * 2, w)
        if tracker is not None:
            tracker.phase = "backward"
        loss.backward()
        return w

    w = step()  # real tensors, no mode: the sum reuses the forward's buffer (a fresh one would have another address)
    assert w.grad.data_ptr() == born["grad_w"]
    with MemoryTracker(detail=True) as tracker:
        step(tracker)
    # at the tracker's backward peak: the weight, the forward's gradient and the embedding's; no out-of-place sum
    blocks = [b for b in tracker.phase_snapshots["backward"].blocks if b[3] == (4096, 64)]
    assert len(blocks) == 3, blocks


@pytest.mark.slow
def test_tied_trainable_head_matches_trace():
    """Full fine-tuning with a tied lm_head (Qwen2-VL-2B ties it): the fused loss's weight gradient waits in the
    embedding's AccumulateGrad buffer and the embedding's is added into it in place. A vocabulary of 8192 makes the
    vocab x hidden gradient the backward's largest term."""
    pytest.importorskip("transformers")
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")
    pytest.importorskip("llamafactory")
    from vlplan.profiler.trace import run_trace

    spec = tiny_spec("qwen2-vl-2b")
    assert spec.text.tie_word_embeddings
    spec = replace(spec, text=replace(spec.text, vocab_size=8192))
    setup = make_setup(spec, method="full", **SMALL)
    assert not any("liger" in w and "tied" in w for w in setup_warnings(setup))
    assert_phases_match(simulate(setup), run_trace(setup))


def test_unpatched_family_is_modelled_as_no_change():
    # LLaMA-Factory's apply_liger_kernel has no branch for qwen3_vl: it logs and patches nothing
    setup = make_setup(resolve("qwen3-vl-8b"), stack="llamafactory", liger_kernel=True)
    assert not any("liger" in w for w in setup_warnings(setup))
    assert liger.swaps(setup) == frozenset()


def test_flag_and_llamafactory_round_trip(tmp_path):
    out = tmp_path / "train.yaml"
    result = CliRunner().invoke(app, ["plan", "--model", "llava-1.5-7b", "--stack", "llamafactory", "--liger-kernel",
                                      "--global-batch-size", "8", "--export-llamafactory", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text())["enable_liger_kernel"] is True
    result = CliRunner().invoke(app, ["estimate", "--from-llamafactory", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["liger_kernel"] is True and not any("liger" in w for w in data["warnings"])
    plain = CliRunner().invoke(app, ["estimate", "--from-llamafactory", str(out), "--no-liger-kernel", "--json"])
    assert json.loads(plain.stdout)["phase_allocated_bytes"]["loss"] > data["phase_allocated_bytes"]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_simulation_matches_trace(method):
    pytest.importorskip("transformers")
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")  # liger's modules import it (the tracer never launches a kernel)
    pytest.importorskip("llamafactory")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec("llava-1.5-7b"), method=method, **SMALL)
    traced = run_trace(setup)
    assert_phases_match(simulate(setup), traced)
    plain = simulate(make_setup(tiny_spec("llava-1.5-7b"), method=method, **dict(SMALL, liger_kernel=False)))
    assert simulate(setup).phase_peaks["loss"] < plain.phase_peaks["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen2-vl-7b", "qwen2.5-vl-7b"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_qwen_simulation_matches_trace(model, method):
    """Liger's Qwen patch as liger's own apply_liger_kernel_to_qwen2(_5)_vl applies it (LLaMA-Factory's dispatch),
    over the ported lce_forward, with the RMSNorm / SwiGLU / LayerNorm / fused-loss Functions emulated."""
    pytest.importorskip("transformers")
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")
    pytest.importorskip("llamafactory")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec(model), method=method, **SMALL)
    assert_phases_match(simulate(setup), run_trace(setup))
    plain = simulate(make_setup(tiny_spec(model), method=method, **dict(SMALL, liger_kernel=False)))
    assert simulate(setup).phase_peaks["loss"] < plain.phase_peaks["loss"]


@pytest.mark.slow
def test_trace_says_what_it_emulated():
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")
    pytest.importorskip("llamafactory")
    from vlplan.profiler.trace import trace

    result = trace(make_setup(tiny_spec("llava-1.5-7b"), **SMALL), layers=1)
    assert result.to_dict()["emulated"] and "LigerFusedLinearCrossEntropyFunction" in result.emulated[0]


def test_paligemma_patch_fails_at_the_first_step_here():
    """The oracle for `RUNTIME_FAILURES`: LLaMA-Factory's own apply_liger_kernel applies liger's PaliGemma patch,
    and the patched forward raises on transformers 5.23 (the model is built first, so no Triton kernel runs before
    the failing line; every patched module is restored after)."""
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")
    pytest.importorskip("llamafactory")
    import types

    import torch
    from transformers import PaliGemmaForConditionalGeneration

    from test_accuracy_mllama_idefics3_paligemma import tiny
    from vlplan.profiler.build import hf_config, llamafactory_checkpointing
    from vlplan.profiler.liger_emulate import _restore, _snapshot

    spec = tiny("paligemma2-3b")
    assert "AttributeError" in liger.not_modelled_reason(make_setup(spec, stack="llamafactory", liger_kernel=True))
    config = hf_config(spec, "sdpa")
    model = PaliGemmaForConditionalGeneration(config).train()
    llamafactory_checkpointing()
    from llamafactory.model.model_utils.liger_kernel import apply_liger_kernel

    saved = [s for name in ("paligemma", "gemma", "gemma2", "siglip") for s in _snapshot(name)]
    layer_norm = torch.nn.LayerNorm
    try:
        apply_liger_kernel(types.SimpleNamespace(model_type="paligemma"),
                           types.SimpleNamespace(enable_liger_kernel=True), is_trainable=True, require_logits=False)
        tokens = spec.processor.tokens_per_view
        ids = torch.full((1, tokens + 8), 5)
        ids[0, :tokens] = config.image_token_id
        pixels = torch.zeros(1, 3, spec.vision.image_size, spec.vision.image_size)
        with pytest.raises(AttributeError, match="numel"):
            model(input_ids=ids, pixel_values=pixels, token_type_ids=torch.zeros_like(ids), labels=ids)
    finally:
        torch.nn.LayerNorm = layer_norm
        _restore(saved)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_gemma3_simulation_matches_trace(method):
    """Gemma 3 as liger's apply_liger_kernel_to_gemma3 patches it (LLaMA-Factory's dispatch): LigerRMSNormForGemma3
    (offset 1, gemma casting, not in place; on the transposed q/k projections a contiguous copy), LigerGEGLUMLP, the
    in-place RoPE (a copy after q_norm/k_norm), SigLIP's LayerNorm, and the fused loss in multimodal_forward."""
    pytest.importorskip("transformers")
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")
    pytest.importorskip("llamafactory")
    from test_accuracy_internvl_gemma3 import tiny_gemma3
    from vlplan.profiler.trace import run_trace

    counts = dict(text=2, vision=2)
    setup = make_setup(tiny_gemma3(), method=method, seq_len=96, stack="llamafactory", liger_kernel=True)
    assert {"rms_norm", "geglu", "rope", "layer_norm", "fused_linear_cross_entropy"} == liger.swaps(setup)
    assert_phases_match(simulate(setup, counts), run_trace(setup, counts))
    if method == "lora":  # (full: the tied head's gradient, computed in the loss's forward, outweighs tiny logits)
        plain = simulate(replace(setup, liger_kernel=False), counts)
        assert simulate(setup, counts).phase_peaks["loss"] < plain.phase_peaks["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_mllama_simulation_matches_trace(method):
    """Mllama as apply_liger_kernel_to_mllama patches it: LigerRMSNorm (in place; a contiguous copy on the
    cross-attention's transposed q/k), LigerSwiGLUMLP, the in-place RoPE on the projections themselves, the vision
    tower's LayerNorm; no fused loss (it patches MllamaForCausalLM, which the ForConditionalGeneration never runs)."""
    pytest.importorskip("transformers")
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")
    pytest.importorskip("llamafactory")
    from test_accuracy_mllama_idefics3_paligemma import MLLAMA_COUNTS, tiny
    from vlplan.profiler.trace import run_trace

    # LoRA without checkpointing: with it LLaMA-Factory's stack cannot train Mllama (mllama/memory.py check_setup)
    setup = make_setup(tiny("llama-3.2-11b-vision"), method=method, seq_len=64, image_size=(112, 56),
                       stack="llamafactory", liger_kernel=True, gradient_checkpointing=method != "lora")
    assert "fused_linear_cross_entropy" not in liger.swaps(setup)
    assert_phases_match(simulate(setup, MLLAMA_COUNTS), run_trace(setup, MLLAMA_COUNTS))
