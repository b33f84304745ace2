"""The SDPA kernel table (planner/memory/sdpa.py) against cases worked out by hand from torch's selection code
(aten/src/ATen/native/transformers/cuda/sdp_utils.cpp `select_sdp_backend`), and the estimator and the tracer, which
both read it, against each other on a GPU that runs FlashAttention-2."""

import pytest

from vlplan.planner.hardware import CATALOG
from vlplan.planner.memory.sdpa import GPU_ARCH, sdpa_backend, sdpa_class


@pytest.mark.parametrize("gpu, dtype, head_dim, masked, expected", [
    # check_prefer_cudnn_attention: cuDNN first on sm90 (H100, H200, H20), with or without a mask
    ("h100-80g", "bf16", 128, False, "cudnn"),
    ("h200-141g", "bf16", 128, True, "cudnn"),
    ("h20-96g", "fp16", 64, False, "cudnn"),
    # sm90 cuDNN backward takes d <= 128, 192/128 or 256/256 (check_cudnn_d256_bprop_head_dim): 160 falls to flash
    ("h100-80g", "bf16", 160, False, "flash"),
    # elsewhere the default order flash, efficient, math, cudnn: FlashAttention-2 without a mask on sm80+
    ("a100-80g", "bf16", 128, False, "flash"),
    ("l40s-48g", "bf16", 128, False, "flash"),
    ("rtx4090-24g", "bf16", 80, False, "flash"),
    # sm86/sm89 training: flash takes head_dim <= 192, or > 224 without dropout
    ("rtx4090-24g", "bf16", 256, False, "flash"),
    ("rtx4090-24g", "bf16", 200, False, "efficient"),
    ("a100-80g", "bf16", 200, False, "flash"),  # sm80 has no such limit
    # a mask: no flash (check_for_attn_mask), so memory-efficient attention off Hopper
    ("a100-80g", "bf16", 128, True, "efficient"),
    ("rtx4090-24g", "fp16", 64, True, "efficient"),
    # before sm80: no flash, no cuDNN; efficient takes fp16 but not bf16, which falls to math
    ("t4-16g", "fp16", 128, False, "efficient"),
    ("v100-32g", "fp16", 64, False, "efficient"),
    ("v100-32g", "bf16", 64, False, "math"),
    # fp32: neither flash nor cuDNN; efficient needs the head dim divisible by 4 on sm80+
    ("h100-80g", "fp32", 128, False, "efficient"),
    ("a100-80g", "fp32", 6, False, "math"),
    # head dims above 256 take no fused half kernel but efficient attention
    ("a100-80g", "bf16", 512, False, "efficient"),
])
def test_backend_choice(gpu, dtype, head_dim, masked, expected):
    assert sdpa_backend(gpu, dtype, head_dim, masked) == expected


def test_every_catalog_gpu_has_an_architecture():
    assert {gpu.name for gpu in CATALOG} == set(GPU_ARCH)


def test_gpus_with_the_same_kernels_share_a_simulation():
    from dataclasses import replace

    from vlplan.planner.hardware import find_gpu
    from vlplan.planner.memory.step import simulation_key
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup

    setup = make_setup(resolve("qwen2-vl-2b"), precision="fp16")
    keys = {name: simulation_key(replace(setup, gpu=find_gpu(name))) for name in ("h100-80g", "h200-141g",
                                                                                  "a100-80g", "l40s-48g", "t4-16g")}
    assert keys["h100-80g"] == keys["h200-141g"] and keys["a100-80g"] == keys["l40s-48g"]
    assert len(set(keys.values())) == 3
    assert sdpa_class("a100-80g") != sdpa_class("h100-80g")


def test_flash_attention_backward_workspace_in_the_estimate():
    """FlashAttention-2's backward (flash_api.cpp `mha_bwd`) rounds seq to 128 and the head dim to 32 in its fp32
    workspaces and expands dk/dv per query head under GQA; cuDNN's holds a dQ accumulator and a row sum."""
    from vlplan.planner.memory.ops import _backward_workspace
    from vlplan.planner.memory.sim import Engine

    e = Engine()
    batch, seq, heads, kv_heads, d = 2, 1000, 28, 4, 128
    q = e.new(batch * seq * heads * d, "bf16")
    k = e.new(batch * seq * kv_heads * d, "bf16")
    flash = _backward_workspace("flash", q, k, heads, batch * seq, seq, d)
    assert flash == (batch * heads * 1024 * 4 + batch * 1024 * heads * 128 * 4  # softmax_d, dq_accum
                     + 2 * batch * seq * heads * d * 2)  # dk, dv expanded to every query head
    assert _backward_workspace("cudnn", q, k, heads, batch * seq, seq, d) == q.numel * 4 + heads * batch * seq * 4


@pytest.mark.parametrize("gpu, backend", [("h100-80g", "cudnn"), ("a100-80g", "flash"), ("t4-16g", "efficient")])
def test_tracer_kernel_allocates_what_the_estimator_models(gpu, backend):
    """One causal GQA attention call (fp16, batch 2, seq 200, 4 query and 2 key/value heads, head dim 64) through the
    tracer's emulation of the GPU's kernel (profiler/emulate.py): its allocation log holds the estimator's
    logsumexp and backward workspace (planner/memory/ops.py), block by block."""
    torch = pytest.importorskip("torch")
    from vlplan.planner.memory.ops import _backward_workspace, _lse_numel
    from vlplan.planner.memory.sim import Engine, rounded
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup
    from vlplan.profiler import emulate
    from vlplan.profiler.memtrack import MemoryTracker, recording_allocations

    b, s, h, kv, d = 2, 200, 4, 2, 64
    assert sdpa_backend(gpu, "fp16", d, False) == backend
    setup = make_setup(resolve("qwen2-vl-2b"), gpu=gpu, precision="fp16")
    with emulate.cuda_emulation(setup, fake=True), emulate.fake_mode():
        q = torch.empty(b, s, h, d, dtype=torch.float16).transpose(1, 2).requires_grad_()
        k, v = (torch.empty(b, s, kv, d, dtype=torch.float16).transpose(1, 2).requires_grad_() for _ in range(2))
        with recording_allocations() as logs, MemoryTracker() as tracker:
            emulate.set_tracker(tracker)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out.backward(torch.empty_like(out))
    log = next(log for log in logs if any(n == b * s * h * d * 2 for _, n in log))
    sizes = [n for _, n in log if n]
    out_bytes, kv_bytes = b * s * h * d * 2, b * s * kv * d * 2
    e = Engine()
    workspace = _backward_workspace(backend, e.new(b * s * h * d, "fp16"), e.new(b * s * kv * d, "fp16"), h, b * s,
                                    s, d)
    lse = _lse_numel(backend, h, b * s, s) * 4
    # forward: the output and the logsumexp; backward: the incoming gradient, then the kernel's allocations
    assert sizes[:3] == [out_bytes, rounded(lse), out_bytes]
    pieces = list(sizes[3:])
    for grad in (out_bytes, kv_bytes, kv_bytes):  # dq, dk, dv; what is left is the kernel's workspace
        pieces.remove(grad)
    assert pieces and 0 <= sum(pieces) - workspace < 512 * len(pieces)  # equal up to the 512-byte blocks


@pytest.mark.slow
@pytest.mark.parametrize("gpu, kwargs", [
    ("a100-80g", dict(method="lora", gradient_checkpointing=False)),  # FlashAttention-2, GQA in the language model
    ("a100-80g", dict(method="full", train_vision=True)),
    ("t4-16g", dict(method="lora", precision="fp16", gradient_checkpointing=False)),  # memory-efficient attention
])
def test_estimate_matches_trace_off_hopper(gpu, kwargs):
    """The estimator and the tracer pick the same kernel from the table and model its memory alike, per phase."""
    pytest.importorskip("transformers")
    from tiny import assert_phases_match, tiny_spec
    from vlplan.planner.memory.step import simulate
    from vlplan.planner.setup import make_setup
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec("qwen2.5-vl-3b"), seq_len=200, image_size=(112, 112), gpu=gpu, **kwargs)
    assert_phases_match(simulate(setup), run_trace(setup))
