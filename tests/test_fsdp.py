"""FSDP2: the estimator's terms (planner/memory/fsdp.py) against torch's own FSDPMemTracker over `fully_shard` on
fake tensors with a fake process group (profiler/fsdp_trace.py), phase by phase; validation; the estimate's shape."""

from __future__ import annotations

import pytest
from tiny import TOLERANCE, tiny_spec

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory.estimate import estimate, param_summary
from vlplan.planner.memory.fsdp import (
    ACCUMULATED_GRADIENTS,
    EARLY_GRADIENT,
    fsdp_states,
    fsdp_units,
    shard_size,
    single_gpu_optimizer_bytes,
)
from vlplan.planner.memory.step import simulate_extrapolated
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

# The tracker sees FSDP's model states and buffers by category; two of the estimate's terms are real memory it files
# as temporaries: an untied lm_head's gradient before the root's post-backward, and under gradient accumulation the
# fresh gradient autograd adds in place into the accumulated one. They are left out of the comparison.
TRACKER_TEMPORARIES = (EARLY_GRADIENT,)
TRANSIENT_KEYS = ("fsdp/unsharded_parameters", "fsdp/all_gather_buffers", "fsdp/unsharded_gradients",
                  "fsdp/reduce_scatter_buffers", ACCUMULATED_GRADIENTS)
TRACKER_TRANSIENTS = ("Unsharded Param", "All Gather", "Unsharded Grad", "Reduce Scatter")

ORACLE_CASES = [
    ("qwen2-vl-2b", dict(method="full", num_gpus=4, seq_len=128, image_size=(112, 112))),
    ("qwen2-vl-2b", dict(method="lora", num_gpus=4, num_nodes=2, fsdp="hybrid_shard", gradient_accumulation_steps=2,
                         seq_len=128, image_size=(112, 112))),
    ("qwen2-vl-2b", dict(method="lora", num_gpus=2, fsdp="shard_grad_op", precision="fp32", seq_len=128,
                         image_size=(112, 112))),
    ("llava-1.5-7b", dict(method="lora", train_vision=True, num_gpus=8, seq_len=128)),
    ("llava-1.5-7b", dict(method="full", num_gpus=2, offload="all", seq_len=128)),
]


def _estimated(setup, phase: str, terms: dict[str, int]) -> int:
    skip = set(TRACKER_TEMPORARIES)
    if setup.gradient_accumulation_steps > 1:
        skip.add("fsdp/unsharded_gradients")
    return sum(v for k, v in terms.items() if k not in skip)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", ORACLE_CASES,
                         ids=[f"{n}-{kw['method']}-{kw.get('fsdp', 'full_shard')}-{kw.get('offload', 'none')}"
                              for n, kw in ORACLE_CASES])
def test_estimate_equals_fsdp_mem_tracker(name, kw):
    pytest.importorskip("torch")
    from vlplan.profiler.fsdp_trace import fsdp_trace

    setup = make_setup(tiny_spec(name, text_layers=3, vision_layers=2), sharding="fsdp", **kw)
    sim = simulate_extrapolated(setup)
    states = fsdp_states(setup, single_gpu_optimizer_bytes(sim.phase_breakdown["optimizer"]))
    traced = fsdp_trace(setup)
    per_gpu_host = {k: v // setup.num_gpus for k, v in states.cpu_per_node.items()}
    for phase, phases in (("forward", ("forward", "loss")), ("backward", ("backward",)),
                          ("optimizer", ("optimizer",))):
        expected = traced.sharded_states(phase)
        if setup.offload == "all":
            # one CPU holds what the GPU and the host would: the buffers in flight are the GPU's
            at = traced.phase_at_peak[phase]
            expected = sum(at[k] for k in TRACKER_TRANSIENTS)
            got = max(sum(v for k, v in states.gpu[p].items() if k in TRANSIENT_KEYS and k not in TRACKER_TEMPORARIES)
                      for p in phases)
        else:
            got = max(_estimated(setup, p, states.gpu[p]) for p in phases)
        assert abs(got - expected) <= TOLERANCE * expected, (
            f"{phase}: estimated {got} B, FSDPMemTracker {expected} B ({100 * (got - expected) / expected:+.3f}%)")
    if setup.offload == "all":
        at = traced.phase_at_peak["optimizer"]
        host = at["Sharded Param"] + at["Sharded Grad"] + at["OptState"] - traced.step_counter_bytes
        got = sum(per_gpu_host.values())
        assert abs(got - host) <= TOLERANCE * host, (got, host)


def _setup(**kw):
    return make_setup(resolve("qwen2.5-vl-7b"), **kw)


def test_units_partition_the_model():
    """The units hold every parameter once: their stored bytes sum to the model's, whatever the family."""
    for name in ("qwen2.5-vl-7b", "llava-1.5-7b", "gemma-3-4b", "llama-3.2-11b-vision", "internvl3-1b",
                 "paligemma2-3b"):
        setup = make_setup(resolve(name), method="full", train_vision=True, train_projector=True, num_gpus=8,
                           sharding="fsdp", num_images=0)
        units = fsdp_units(setup)
        total = param_summary(setup)[0]["total"]
        assert 0 < sum(u.params for u in units[1:]) < total
        # fp32 trainable everywhere: 4 bytes per parameter in the units and the root together
        assert sum(u.stored_bytes for u in units) == 4 * total


def test_full_shard_divides_the_model_states():
    one, eight = (estimate(_setup(method="full", num_gpus=n, sharding="fsdp")) for n in (2, 8))
    assert one.breakdown_bytes["weights/fsdp_shard"] == pytest.approx(4 * eight.breakdown_bytes["weights/fsdp_shard"],
                                                                      rel=1e-6)
    assert eight.peak_bytes < one.peak_bytes
    e = eight
    assert sum(e.breakdown_bytes.values()) == e.peak_bytes
    assert not any(k.startswith(("weights/language", "gradients/language", "optimizer/adam_states"))
                   for k in e.breakdown_bytes)


def test_strategies_order_memory():
    """no_shard keeps everything, shard_grad_op keeps the gathered parameters after forward, full_shard least."""
    peaks = {s: estimate(_setup(method="full", num_gpus=8, sharding="fsdp", fsdp=s)).peak_bytes
             for s in ("full_shard", "shard_grad_op", "no_shard")}
    assert peaks["full_shard"] < peaks["shard_grad_op"] < peaks["no_shard"]
    hybrid = estimate(_setup(method="full", num_gpus=8, num_nodes=2, sharding="fsdp", fsdp="hybrid_shard"))
    full = estimate(_setup(method="full", num_gpus=8, num_nodes=2, sharding="fsdp"))
    assert shard_size(hybrid.setup) == 8 and shard_size(full.setup) == 16
    assert full.peak_bytes < hybrid.peak_bytes


def test_cpu_offload_moves_the_shards_to_the_host():
    on = estimate(_setup(method="full", num_gpus=8, sharding="fsdp", offload="all"))
    off = estimate(_setup(method="full", num_gpus=8, sharding="fsdp"))
    assert on.peak_bytes < off.peak_bytes
    assert "weights/fsdp_shard" not in on.breakdown_bytes
    assert on.cpu_breakdown_bytes["offload/fsdp_parameters"] == 8 * off.breakdown_bytes["weights/fsdp_shard"]
    assert on.cpu_ram_bytes > off.cpu_ram_bytes


def test_sharded_qlora():
    """4-bit weights stored in the compute dtype shard under FSDP and ZeRO-3; the quant state stays whole."""
    fsdp = estimate(_setup(method="qlora", num_gpus=8, sharding="fsdp"))
    zero3 = estimate(_setup(method="qlora", num_gpus=8, zero=3))
    single = estimate(_setup(method="qlora"))
    assert fsdp.breakdown_bytes["weights/quant_state"] == zero3.breakdown_bytes["weights/quant_state"] > 0
    assert fsdp.breakdown_bytes["weights/fsdp_shard"] < single.breakdown_bytes["weights/language"] / 4
    assert zero3.breakdown_bytes["weights/half_partition"] < single.breakdown_bytes["weights/language"] / 4
    with pytest.raises(VlplanError, match="needs --quant-bits 4"):
        _setup(method="qlora", quant_bits=8, num_gpus=8, zero=3)
    with pytest.raises(VlplanError, match="needs --quant-bits 4"):
        _setup(method="qlora", quant_bits=8, num_gpus=8, sharding="fsdp")


@pytest.mark.parametrize("kw,match", [
    (dict(sharding="fsdp", zero=3), "use one of them"),
    (dict(sharding="fsdp", offload="optimizer"), "together"),
    (dict(sharding="fsdp", fsdp="hybrid_shard"), "num-nodes 2"),
    (dict(fsdp="shard_grad_op"), "add --sharding fsdp"),
    (dict(sharding="megatron"), "--sharding 'megatron' is not one of"),
    (dict(sharding="fsdp", fsdp="zero3"), "--fsdp 'zero3' is not one of"),
])
def test_refused(kw, match):
    with pytest.raises(VlplanError, match=match):
        _setup(method="full", num_gpus=2, **kw)


def test_zero_setups_describe_as_before():
    assert "sharding" not in _setup().describe()
    assert _setup(sharding="fsdp", num_gpus=2).describe()["fsdp"] == "full_shard"


def test_communication_volume():
    """Per micro-step FSDP all-gathers every unit in forward and again in backward (not with shard_grad_op), and
    reduce-scatters the gradients once per step; hybrid_shard adds the replicas' all-reduce."""
    from vlplan.planner.memory.fsdp import fsdp_communication_bytes
    from vlplan.planner.throughput import step_time

    full = _setup(method="full", num_gpus=8, sharding="fsdp", gradient_accumulation_steps=2)
    units = fsdp_units(full)
    gathered = sum(u.gathered_bytes for u in units)
    again = sum(u.gathered_bytes for u in units if u.backward)
    volume = fsdp_communication_bytes(full)
    assert volume["allgather_parameters"] == 2 * (gathered + again)
    assert volume["reduce_scatter_gradients"] == sum(u.reduce_bytes for u in units)
    grad_op = fsdp_communication_bytes(_setup(method="full", num_gpus=8, sharding="fsdp", fsdp="shard_grad_op"))
    assert grad_op["allgather_parameters"] == gathered
    hybrid = _setup(method="full", num_gpus=8, num_nodes=2, sharding="fsdp", fsdp="hybrid_shard")
    parts = step_time(hybrid).parts
    assert parts["allreduce_gradients"] > 0 and "allreduce_gradients" not in step_time(full).parts
    offload = step_time(_setup(method="full", num_gpus=8, sharding="fsdp", offload="all")).parts
    assert offload["offload_parameters"] > 0 and offload["cpu_adam"] > 0
