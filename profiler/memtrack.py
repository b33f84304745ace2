"""A live-tensor memory tracker: a TorchDispatchMode that sees every tensor an op creates and when it dies.

Bytes are counted per storage (views share their base's storage), rounded up to the CUDA caching allocator's
512-byte block size (c10/cuda/CUDACachingAllocator.cpp `kMinBlockSize`, `round_size`), so the running total is what
`torch.cuda.memory_allocated` would show. Works on real tensors and under `FakeTensorMode` alike: a storage is
freed when its Python storage object dies (weakref callback), as torch's own `MemTracker` does.

Each storage carries a category (parameters, gradients, optimizer_states, activations, temporaries, inputs) and the
module that created it. The breakdown at the peak is captured at the first free after a new maximum (the state at
a local maximum equals the state just before the next free), so the snapshot costs nothing per op.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from vlplan.planner.memory.sim import collect_logs

CUDA_BLOCK_BYTES = 512  # c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize; every allocation is rounded up to it

CATEGORIES = ("parameters", "gradients", "optimizer_states", "inputs", "activations", "temporaries")
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def rounded_bytes(nbytes: int) -> int:
    if nbytes <= 0:
        return 0
    return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


@dataclass
class _Block:
    nbytes: int
    category: str
    module: str
    phase: str
    op: str = ""
    shape: tuple = ()
    dtype: str = ""


@dataclass
class Snapshot:
    total_bytes: int = 0
    phase: str = ""
    by_category: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    by_phase_created: dict[str, int] = field(default_factory=dict)
    # With `MemoryTracker(detail=True)`: every live block at the peak (category, module, op, shape, dtype, bytes)
    blocks: list[tuple] = field(default_factory=list)


# Allocation log (for planner/memory/allocator.py's replay) -------------------------------------------------------
_ALLOCATION_LOGS: ContextVar[list | None] = ContextVar("tracker_allocation_logs", default=None)


@contextmanager
def recording_allocations():
    """Within the block, every new MemoryTracker logs each storage it starts tracking and each one that dies, in
    order, as `(key, rounded bytes)` / `(key, 0)` events in a list appended to the yielded list (the input format of
    `planner.memory.allocator.replay`, the same as planner/memory/sim.py's log)."""
    with collect_logs(_ALLOCATION_LOGS) as logs:
        yield logs
# ------------------------------------------------------------------------------------------------------------------


# Backward segments (`subphase`, set by profiler/trace.py's gradient hooks) -> the scope of their temporaries:
# the loss's backward, the language model's, then the encoder's (the vision tower's; the projector's few MiB of
# backward temporaries are counted with it, where the estimator names them temporaries/projector)
BACKWARD_SCOPES = {"loss": "loss", "language": "language", "encoder": "vision"}


class MemoryTracker(TorchDispatchMode):
    """Track live storage bytes through a training step.

    `phase` is set by the caller (forward, loss, backward, optimizer); `module_stack` by module hooks
    (`track_modules`). New storages are categorized by `default_category` (activations in forward and loss,
    temporaries in backward and optimizer) unless tagged explicitly with `tag`. `phase_snapshots` holds, per phase,
    the breakdown at that phase's peak; `peak` is the highest of them.
    """

    def __init__(self, detail: bool = False) -> None:
        super().__init__()
        _calibrate_sole_refs()
        self.detail = detail
        self._op = ""
        self._blocks: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self.current_bytes = 0
        self._phase = "setup"
        self._subphase = ""
        self.phase_snapshots: dict[str, Snapshot] = {}
        self._segments: dict[str, Snapshot] = {}
        self._pending: Snapshot | None = None  # the phase snapshot whose maximum is the current state
        self.module_stack: list[str] = []
        self.paused = False  # emulations compute values without counting the CPU kernels' buffers
        self.scope_of = None  # module name -> scope name for default categories
        self._by_category: dict[str, int] = defaultdict(int)
        self._by_module: dict[str, int] = defaultdict(int)
        self._by_phase: dict[str, int] = defaultdict(int)
        logs = _ALLOCATION_LOGS.get()  # allocation log: None unless recording_allocations() is active
        self.allocation_log: list | None = None if logs is None else []
        if logs is not None:
            logs.append(self.allocation_log)

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self.snapshot_peak()
        self._phase = value
        self._subphase = ""

    @property
    def subphase(self) -> str:
        return self._subphase

    @subphase.setter
    def subphase(self, value: str) -> None:
        """A segment of the phase (the component running): peaks are also kept per (phase, segment), because each
        segment's peak is affine in the number of layers while their maximum is not."""
        self.snapshot_peak()
        self._subphase = value

    def segment_snapshots(self) -> dict[str, Snapshot]:
        self.snapshot_peak()
        return dict(self._segments)

    @property
    def peak(self) -> Snapshot:
        self.snapshot_peak()
        if not self.phase_snapshots:
            return Snapshot()
        return max(self.phase_snapshots.values(), key=lambda snap: snap.total_bytes)

    # Registration ---------------------------------------------------------------------------------------------
    def default_category(self) -> str:
        """activations/<scope> in forward and loss, temporaries/<scope> in backward and the optimizer step; the scope
        is `scope_of(module)` (e.g. the component owning the running module) or the phase."""
        kind = "activations" if self._phase in ("forward", "loss") else "temporaries"
        if self._phase == "loss":
            return f"{kind}/loss"
        module = self.module_stack[-1] if self.module_stack else ""
        if module and self.scope_of:
            scope = self.scope_of(module)
        elif self._phase == "backward" and self._subphase in BACKWARD_SCOPES:
            # backward runs no forward hooks (outside checkpoint recomputation): the segment marked by the trace's
            # gradient hooks says whose backward runs, named as the estimator names the same temporaries
            # (planner/memory/sim.py: a backward node's category is the scope of its forward op)
            scope = BACKWARD_SCOPES[self._subphase]
        else:
            scope = self._phase
        return f"{kind}/{scope}"

    def track(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Register (or re-tag, when `category` is given) the storage behind `tensor`."""
        if not isinstance(tensor, torch.Tensor):
            return
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse or other storage-less tensors
            return
        block = self._blocks.get(storage)
        if block is not None:
            if category is not None and block.category != category:
                self._move(block, category)
            return
        nbytes = rounded_bytes(storage.nbytes())
        module = self.module_stack[-1] if self.module_stack else ""
        block = _Block(nbytes, category or self.default_category(), module, self._phase)
        if self.detail:
            block.op, block.shape, block.dtype = self._op, tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")
        self._blocks[storage] = block
        key = id(storage)
        self._refs[key] = weakref.ref(storage, lambda _ref, block=block, key=key: self._free(block, key))
        if self.allocation_log is not None and nbytes:
            self.allocation_log.append((key, nbytes))
        self._add(block, +1)

    def tag(self, tensors, category: str) -> None:
        for tensor in tensors:
            if tensor is not None:
                self.track(tensor, category)

    # Accounting -----------------------------------------------------------------------------------------------
    def _add(self, block: _Block, sign: int) -> None:
        delta = sign * block.nbytes
        self.current_bytes += delta
        self._by_category[block.category] += delta
        self._by_module[_module_group(block.module)] += delta
        self._by_phase[block.phase] += delta
        if sign > 0:
            key = f"{self._phase}/{self._subphase}" if self._subphase else self._phase
            pending = []
            for table, name in ((self.phase_snapshots, self._phase), (self._segments, key)):
                snap = table.get(name)
                if snap is None:
                    snap = table[name] = Snapshot(phase=name)
                if self.current_bytes > snap.total_bytes:
                    snap.total_bytes = self.current_bytes
                    pending.append(snap)
            if pending:
                self._pending = pending

    def _move(self, block: _Block, category: str) -> None:
        self._by_category[block.category] -= block.nbytes
        self._by_category[category] += block.nbytes
        block.category = category

    def _free(self, block: _Block, key: int) -> None:
        self._refs.pop(key, None)
        if self.allocation_log is not None and block.nbytes:
            self.allocation_log.append((key, 0))
        self.snapshot_peak(dying=block)
        self._add(block, -1)

    def snapshot_peak(self, dying: _Block | None = None) -> None:
        """Record the breakdown of the pending phase/segment peaks (the current state is their maximum)."""
        for snap in self._pending or ():
            if self.current_bytes != snap.total_bytes:
                continue
            snap.by_category = {k: v for k, v in self._by_category.items() if v}
            snap.by_module = {k: v for k, v in self._by_module.items() if v}
            snap.by_phase_created = {k: v for k, v in self._by_phase.items() if v}
            if self.detail:
                live = list(self._blocks.values()) + ([dying] if dying is not None else [])
                snap.blocks = [(b.category, b.module, b.op, b.shape, b.dtype, b.nbytes, b.phase) for b in live]
        self._pending = None

    def reset_peak(self) -> None:
        """Forget earlier peaks (e.g. of a warm-up step)."""
        self.snapshot_peak()
        self.phase_snapshots = {}
        self._segments = {}

    def live_by_category(self) -> dict[str, int]:
        return {k: v for k, v in self._by_category.items() if v}

    # Dispatch -------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        if self.detail:
            self._op = str(func.__name__)
        self._undo_out_of_place(func, args, kwargs, out)  # before the output counts, so no false peak
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out

    def _undo_out_of_place(self, func, args, kwargs, out) -> None:
        """Count as in place what the autograd engine does out of place only because a dispatch mode is active.

        With any TorchDispatchMode (this tracker, FakeTensorMode) torch's `isTensorSubclassLike` is true, which
        switches two engine paths out of place: InputBuffer::accumulate (`old + new` instead of `old.add_(new)`) and
        index_backward (`new_zeros(...).index_put(...)` instead of the in-place `_index_put_impl_` into the zeros).
        A plain GPU run accumulates in place when `can_accumulate_inplace(old)` holds (input_buffer.cpp): the
        buffer holds the last reference to `old` and to its storage. A gradient that something else still holds
        (the incoming gradient a reentrant checkpoint keeps for its inner backward, a view) is summed out of place
        there too. The engine runs both with grad mode off and outside any module (recomputed forwards have grad
        mode on), which tells them from model code.
        """
        if (self._phase != "backward" or self.module_stack or torch.is_grad_enabled()
                or not isinstance(out, torch.Tensor)):
            return
        if func is torch.ops.aten.add.Tensor:
            if len(args) != 2 or (kwargs or {}).get("alpha", 1) != 1 or not isinstance(args[1], torch.Tensor):
                return
        elif func is not torch.ops.aten.index_put.default:
            return
        first = args[0]
        if not isinstance(first, torch.Tensor) or first.shape != out.shape or first.dtype != out.dtype:
            return
        if func is torch.ops.aten.add.Tensor and not _sole_reference(first):
            return
        source = self._blocks.get(first.untyped_storage())
        if source is None or source.nbytes != rounded_bytes(out.untyped_storage().nbytes()):
            return
        if self._blocks.get(out.untyped_storage()) is not None:  # the output aliases an existing storage
            return
        # a gradient is a backward temporary or a `.grad`, or one the forward computed and its Function hands back
        # (Liger's fused loss: the hidden states' and head weight's gradients, activations/loss, summed with the
        # tied embedding's in its AccumulateGrad buffer)
        if not source.category.startswith(("temporaries", "gradients", "activations/loss")):
            return
        # the output now owns the bytes; the first input's block counts nothing from here on
        if self.allocation_log is not None:  # in the log: the input's block is freed and the output takes it
            self.allocation_log.append((id(first.untyped_storage()), 0))
        self._add(source, -1)
        source.nbytes = 0


_SOLE_REFS: int | None = None  # sys.getrefcount of a gradient only the engine's InputBuffer holds (calibrated)


def _sole_reference(tensor: torch.Tensor) -> bool:
    """Whether `tensor`, as seen from `_undo_out_of_place`, is held by nothing but the engine: no other Python
    reference (counted against a calibration in the same call path) and no other tensor on its storage."""
    storage_refs = torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)  # this call's storage object + 1
    return sys.getrefcount(tensor) <= _SOLE_REFS and storage_refs <= 2


def _calibrate_sole_refs() -> None:
    """Run one accumulation the engine would do in place (two fresh gradients of one tensor) through the same call
    path and record the reference count it shows there (outside any active mode, with grad enabled)."""
    global _SOLE_REFS
    if _SOLE_REFS is not None:
        return
    seen: list[int] = []

    class _Probe(MemoryTracker):
        def _undo_out_of_place(self, func, args, kwargs, out) -> None:
            if func is torch.ops.aten.add.Tensor and not torch.is_grad_enabled():
                first = args[0]  # the same references as in MemoryTracker._undo_out_of_place
                seen.append(_probe_refs(first))

    _SOLE_REFS = -1  # the probe's own construction must not calibrate again
    with _disable_current_modes(), torch.enable_grad():
        x = torch.ones(4, requires_grad=True)
        y = x.exp()
        with _Probe() as probe:
            probe.phase = "backward"
            (y * 2 + y * 3).sum().backward()
    if not seen:
        _SOLE_REFS = None
        raise RuntimeError("the memory tracker could not calibrate the autograd engine's gradient accumulation")
    _SOLE_REFS = min(seen)


def _probe_refs(tensor: torch.Tensor) -> int:
    return sys.getrefcount(tensor)  # counted in a frame like _sole_reference's


def _module_group(name: str) -> str:
    """'model.language_model.layers.7.mlp.up_proj' -> 'model.language_model.layers.*.mlp.up_proj'."""
    return _LAYER_INDEX.sub(".*", name) if name else "(top level)"


def track_modules(model: torch.nn.Module, tracker: MemoryTracker, depth: int = 6) -> list:
    """Forward pre/post hooks that keep `tracker.module_stack` at the innermost module (names cut to `depth`)."""
    handles = []
    for name, module in model.named_modules():
        if not name or name.count(".") >= depth:
            continue

        def pre(_module, _args, name=name):
            tracker.module_stack.append(name)

        def post(_module, _args, _out, name=name):
            if tracker.module_stack and tracker.module_stack[-1] == name:
                tracker.module_stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles
