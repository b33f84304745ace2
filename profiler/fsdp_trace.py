"""FSDP2 oracle: torch's own `FSDPMemTracker` over `fully_shard` on fake tensors and a fake process group.

The model of the setup is built as training builds it (`build.create_model` + `build.prepare_model`), upcast and
wrapped as accelerate's `fsdp2_prepare_model` does (trainable parameters to fp32 under mixed precision; one
`fully_shard` per module whose class is in the model's `_no_split_modules`, accelerate's TRANSFORMER_BASED_WRAP
default, then the root), with the mixed precision policy accelerate sets (param and reduce dtype = the AMP dtype)
and `CPUOffloadPolicy` for `--offload all`. The process group is torch's fake one (torch.testing._internal
.distributed.fake_pg, as torchtitan's memory estimation uses): collectives return at once, so rank 0 of a
`world_size`-rank job runs alone on the CPU, with fake tensors (no memory, no weights).

`FSDPMemTracker` (torch/distributed/_tools/fsdp2_mem_tracker.py) counts every storage by FSDP category (sharded and
unsharded parameters and gradients, all-gather and reduce-scatter buffers, optimizer states, activations, ...).
`fsdp_trace` records, per phase (forward with the loss, backward, optimizer), the largest value each category and
the model-state sum reach: what `planner/memory/fsdp.py` estimates. Activations are not compared here: the trace
table (docs/accuracy.md) holds them against `vlplan trace`, which emulates the CUDA kernels this CPU run does not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.setup import TrainSetup

from . import build, emulate
from .batch import synthetic_batch

PHASES = ("forward", "backward", "optimizer")
# FSDPMemTracker categories (its _FSDPRefType values) that are model states or FSDP's communication buffers: the
# part of the memory that sharding changes
MODEL_STATE_CATEGORIES = ("Sharded Param", "Unsharded Param", "Buffer", "Sharded Grad", "Unsharded Grad",
                          "All Gather", "Reduce Scatter", "OptState")


@dataclass
class FsdpTrace:
    """Per phase, the largest bytes of each FSDPMemTracker category and of their model-state sum (rank 0's device);
    `host` the same on the CPU when parameters are offloaded."""

    phase_max: dict[str, dict[str, int]]
    phase_model_states: dict[str, int]
    phase_at_peak: dict[str, dict[str, int]]  # the categories at that largest model-state sum
    world_size: int
    step_counter_bytes: int = 0  # of OptState: the optimizer's 0-d step tensors (one per parameter, not sharded)

    def sharded_states(self, phase: str) -> int:
        """The largest model-state sum of `phase` without module buffers and step counters (replicated, small, and
        counted by the estimator with the activations and single-GPU optimizer terms)."""
        at = self.phase_at_peak[phase]
        return self.phase_model_states[phase] - at.get("Buffer", 0) - self.step_counter_bytes


def _mesh(setup: TrainSetup):
    from torch.distributed.device_mesh import init_device_mesh

    if setup.fsdp == "hybrid_shard":
        return init_device_mesh("cpu", (setup.num_nodes, setup.num_gpus), mesh_dim_names=("replicate", "shard"))
    if setup.fsdp == "no_shard":
        return init_device_mesh("cpu", (setup.world_size, 1), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (setup.world_size,))


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """torch's fake process group for rank 0 of `world_size` (collectives are no-ops)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise VlplanError("a process group is already initialized; the FSDP trace needs its own fake one")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap_fsdp(model: torch.nn.Module, setup: TrainSetup, mesh) -> torch.nn.Module:
    """`fully_shard` as accelerate's fsdp2_prepare_model applies it: every `_no_split_modules` block, then the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    amp = build.autocast_dtype(setup)
    if amp is not None and setup.method != "qlora":
        # accelerate: "FSDP2 requires uniform orig_dtype among trainable params": trainable ones upcast to fp32
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=amp) if amp is not None else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=False) if setup.offload == "all" else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload,
                  reshard_after_forward=setup.fsdp != "shard_grad_op")
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules())[::-1]:  # children first, as accelerate's get_module_children_bottom_up
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _tracker_class():
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class PhaseTracker(FSDPMemTracker):
        """FSDPMemTracker that also keeps, per phase, the largest value of each category after every op."""

        phase = "idle"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phase_max: dict[str, dict[str, int]] = {}
            self.phase_model_states: dict[str, int] = {}
            self.phase_at_peak: dict[str, dict[str, int]] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self.sample()
            return out

        def sample(self) -> None:
            if self.phase not in PHASES:
                return
            for device, snap in self._curr_mem_snap.items():
                if device.type != "cpu":
                    continue
                named = {getattr(k, "value", k): v for k, v in snap.items()}
                peaks = self.phase_max.setdefault(self.phase, {})
                for key, value in named.items():
                    peaks[key] = max(peaks.get(key, 0), value)
                states = sum(named.get(k, 0) for k in MODEL_STATE_CATEGORIES)
                if states > self.phase_model_states.get(self.phase, -1):
                    self.phase_model_states[self.phase] = states
                    self.phase_at_peak[self.phase] = {k: named.get(k, 0) for k in MODEL_STATE_CATEGORIES}

    return PhaseTracker


def fsdp_trace(setup: TrainSetup, steps: int = 2) -> FsdpTrace:
    """Trace `steps` steps of rank 0 of the setup's FSDP2 job (the last step is reported)."""
    if setup.sharding != "fsdp":
        raise VlplanError("the FSDP trace needs --sharding fsdp")
    if setup.method == "qlora":
        raise VlplanError("the FSDP trace cannot run bitsandbytes 4-bit layers on the CPU; QLoRA is estimated "
                          "analytically")
    # transformers' data-dependent checks and the CUDA kernels' choices, as `vlplan trace` patches them (emulate.py)
    with fake_process_group(setup.world_size), emulate.cuda_emulation(setup, fake=True):
        mesh = _mesh(setup)
        mode = emulate.fake_mode()
        with mode, emulate.fake_module_conversions():
            model = build.prepare_model(build.create_model(setup), setup)
            model = wrap_fsdp(model, setup, mesh)
            optimizer = build.make_optimizer(model, setup)
        batch = synthetic_batch(replace(setup), model, mode)
        tracker = _tracker_class()(model, optimizer)
        micro_steps = min(setup.gradient_accumulation_steps, 2)
        with mode, tracker:
            for step in range(steps):
                last = step == steps - 1
                for micro in range(micro_steps):
                    # the HF Trainer's accumulation: accelerate's no_sync until the last micro-step
                    model.set_requires_gradient_sync(micro == micro_steps - 1)
                    tracker.phase = "forward" if last else "idle"
                    loss = model(**batch.tensors)["loss"]
                    tracker.phase = "backward" if last else "idle"
                    loss.backward()
                    del loss
                    if micro < micro_steps - 1:
                        tracker.reset_mod_stats()  # module stats cover one forward-backward only
                tracker.phase = "optimizer" if last else "idle"
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.phase = "idle"
                if not last:
                    tracker.reset_mod_stats()  # FSDPMemTracker keeps module stats for one iteration only
        steps_bytes = sum(v.untyped_storage().nbytes() for state in optimizer.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor) and v.dim() == 0)
    return FsdpTrace(tracker.phase_max, tracker.phase_model_states, tracker.phase_at_peak, setup.world_size,
                     steps_bytes)
