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
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

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


class MemoryTracker(TorchDispatchMode):
    """Track live storage bytes through a training step.

    `phase` is set by the caller (forward, loss, backward, optimizer); `module_stack` by module hooks
    (`track_modules`). New storages are categorized by `default_category` (activations in forward and loss,
    temporaries in backward and optimizer) unless tagged explicitly with `tag`. `phase_snapshots` holds, per phase,
    the breakdown at that phase's peak; `peak` is the highest of them.
    """

    def __init__(self, detail: bool = False) -> None:
        super().__init__()
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
        scope = self.scope_of(module) if (module and self.scope_of) else self._phase
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
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


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
