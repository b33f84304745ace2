"""A symbolic autograd memory simulator: the byte-level engine under the activation model.

The activation model (`blocks.py`) re-executes the transformers modeling code of each family on *symbolic* tensors
that carry only a size, a dtype and whether they require grad. This engine does what PyTorch does with memory:

- every op allocates its output (rounded to the CUDA caching allocator's 512-byte blocks) and the output lives
  while something references it: the symbolic code mirrors the modeling code's variable lifetimes, so CPython's
  reference counting frees a symbolic tensor exactly where PyTorch frees the real one;
- an op records an autograd node holding the tensors its backward formula needs (torch's derivatives.yaml: a
  matmul saves an input only if the *other* operand requires grad; softmax saves its result; ...), which keeps
  them alive until the backward pass reaches that node;
- autocast casts follow CUDA's op lists, and casts of trainable fp32 weights are cached for the whole forward
  (aten/src/ATen/autocast_mode.cpp `cached_cast`);
- `backward()` walks the tape in reverse: each node allocates the gradients of its inputs and parameters (plus the
  kernel's workspace), then releases its saved tensors and the incoming gradient, as the autograd engine does.

It is pure Python (no torch) and is held to the byte-exact tracer (`vlplan trace`) by tests/test_accuracy_*.py.
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

BLOCK_BYTES = 512  # c10/cuda/CUDACachingAllocator.cpp kMinBlockSize

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1, "nf4": 1}


def rounded(nbytes: int) -> int:
    return 0 if nbytes <= 0 else -(-nbytes // BLOCK_BYTES) * BLOCK_BYTES


class Storage:
    """One allocation (or `blocks` equal ones made back to back and freed together). Freed (accounted) when the last
    tensor viewing it dies."""

    __slots__ = ("engine", "nbytes", "category", "owner", "blocks", "__weakref__")

    def __init__(self, engine: "Engine", nbytes: int, category: str, owner: str, blocks: int = 1) -> None:
        self.engine, self.category, self.owner, self.blocks = engine, category, owner, blocks
        size = nbytes // blocks if blocks != 1 else nbytes
        # blocks * rounded(size), inlined: the engine's most frequent call
        self.nbytes = blocks * (-(-size // BLOCK_BYTES) * BLOCK_BYTES) if size > 0 else 0
        engine._alloc(self)

    def __del__(self) -> None:
        self.engine._free(self)


class T:
    """A symbolic tensor: `numel` elements of `dtype` on a storage, maybe requiring grad."""

    __slots__ = ("numel", "dtype", "rg", "storage", "name", "node", "__weakref__")

    def __init__(self, numel: int, dtype: str, rg: bool, storage: Storage, name: str) -> None:
        self.numel, self.dtype, self.rg, self.storage, self.name = numel, dtype, rg, storage, name
        self.node = None  # the autograd node that produced it (None for leaves / no-grad results)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    def view(self, numel: int | None = None, name: str | None = None) -> "T":
        """A view: same storage, no allocation (reshape of a contiguous tensor, transpose, slice...)."""
        out = T(self.numel if numel is None else numel, self.dtype, self.rg, self.storage, name or self.name)
        out.node = self.node
        return out


@dataclass(eq=False)
class Param:
    """A parameter (or a group of identical ones): its storage is counted under `weights/*`."""

    name: str
    numel: int
    dtype: str
    trainable: bool
    component: str
    tensor: T | None = None
    grad: T | None = None
    shape: tuple[int, ...] | None = None  # the tensor's dims where it has 2 or more (factored optimizers); else None
    rms: T | None = None  # Adafactor's state["RMS"], a 0-d tensor

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


class Edge:
    """What a node keeps of an input: its size, dtype and producer (like an autograd edge), not its storage."""

    __slots__ = ("numel", "dtype", "rg", "node", "name")

    def __init__(self, t: T) -> None:
        self.numel, self.dtype, self.rg, self.node, self.name = t.numel, t.dtype, t.rg, t.node, t.name


@dataclass(eq=False)
class Node:
    """An autograd node: what its backward needs and what it produces."""

    name: str
    inputs: list  # input tensors whose gradients this node produces (those with rg)
    saved: list  # tensors kept alive until backward reaches this node
    params: list  # trainable parameters receiving a gradient here
    workspace: int = 0  # extra bytes the backward kernel allocates and frees (e.g. attention dq accumulators)
    grad_dtype: dict = field(default_factory=dict)  # input index -> dtype of the produced gradient if it differs
    param_grad_via: str | None = None  # dtype the weight gradient is computed in before accumulating (autocast)
    out_numel: int = 0
    out_dtype: str = "bf16"
    recompute: object = None  # checkpoint nodes: a callable re-running the segment on a detached input
    autocast: str | None = None  # checkpoint nodes: the autocast state the recompute re-enters
    scope: str = "language"
    frame: object = None  # non-reentrant checkpointing: the CheckpointFrame whose recompute supplies `saved`
    deferred: int = 0  # non-reentrant checkpointing: how many tensors the forward packed instead of saving


# Allocation log hook (allocator replay, planner/memory/allocator.py) -------------------------------------------
_ALLOCATION_LOGS: ContextVar[list | None] = ContextVar("allocation_logs", default=None)


@contextmanager
def recording_allocations():
    """Within the block, every new Engine logs its allocations and frees in order, as `(key, nbytes)` events
    (`(key, 0)`: a free) in a list appended to the yielded list: the input of `allocator.replay`. A storage of
    `blocks` equal allocations logs each one; zero-byte storages (never seen by the CUDA allocator) are not logged."""
    with collect_logs(_ALLOCATION_LOGS) as logs:
        yield logs


@contextmanager
def collect_logs(logs_var: ContextVar):
    """Set `logs_var` to a fresh list for the block and yield it: each allocation log made meanwhile is appended to
    it (shared by the simulator's and the tracer's `recording_allocations`)."""
    logs: list[list] = []
    token = logs_var.set(logs)
    try:
        yield logs
    finally:
        logs_var.reset(token)


def _log_storage(log: list, storage: "Storage", nbytes: int) -> None:
    if storage.blocks == 1:
        log.append((id(storage), nbytes))
    else:
        size = nbytes and storage.nbytes // storage.blocks
        log.extend(((id(storage), j), size) for j in range(storage.blocks))
# ------------------------------------------------------------------------------------------------------------------


class Engine:
    """Tracks live bytes per category and the peak of each phase, with a snapshot of the breakdown at each peak."""

    def __init__(self, detail: bool = False) -> None:
        self.detail = detail
        logs = _ALLOCATION_LOGS.get()  # allocator replay hook: None unless recording_allocations() is active
        self.allocation_log: list | None = None if logs is None else []
        if logs is not None:
            logs.append(self.allocation_log)
        self.live = weakref.WeakValueDictionary()
        self.phase_blocks: dict[str, list] = {}
        self.current = 0
        self.by_category: dict[str, int] = {}
        self._phase = self._scope = ""
        self.phase = "setup"
        self.phase_peaks: dict[str, tuple[int, dict[str, int]]] = {}
        # peaks per (phase, scope) segment with their breakdowns: each is affine in the layer counts
        self.segment_peaks: dict[str, tuple[int, dict[str, int]]] = {}
        self.segment_blocks: dict[str, list] = {}
        self.kept_until_backward_end: list = []  # checkpoint forward arguments (see _recompute)
        # Nodes in creation order, held weakly: a node lives as long as a tensor or a later node references it, so a
        # graph no loss depends on (e.g. built from a detached value) is freed with its tensors, as in autograd.
        self.tape: list[weakref.ref] = []
        self.grad_enabled = True
        self.autocast: str | None = None  # "bf16"/"fp16" inside the autocast region
        self.gpu_name = ""  # the GPU whose SDPA kernels run (sdpa.py; "" is an unknown GPU: the Hopper row)
        self.cast_cache: dict[int, T] = {}
        self.params: list[Param] = []
        self.scope = "language"  # the component whose code runs now: names activation/temporary categories
        self.reduce_grads = False  # DeepSpeed ZeRO: gradients are reduced into buckets as they are produced
        # transformers `enable_input_require_grads` ran (stacks: planner/memory/stacks.py): the outputs of every
        # sub-model's input embeddings require grad (`hook_input`)
        self.input_grads = False
        self.liger: frozenset = frozenset()  # the Liger kernel swaps in effect (planner/memory/liger.py `swaps`)
        # DPO's reference forward (planner/memory/preference.py): peft's `disable_adapter()` (LoRA layers run their
        # base layer alone), and the frozen reference copy's parameters counted under `reference/*`
        self.adapters_disabled = False
        self.param_kind: str | None = None
        self.host_bytes = self.host_peak_bytes = 0  # checkpointed inputs offloaded to host RAM (`offload`)
        self.frame: CheckpointFrame | None = None  # the non-reentrant checkpoint running (forward or recompute)
        self._pending: list = []
        self._pending_key = ""
        self._param_uses: dict[int, int] = {}  # parameters used by several nodes of the graph being run backward
        self._param_buffers: dict[int, tuple] = {}  # their gradients summed so far (the AccumulateGrad InputBuffer)

    # Phase and scope: the segment "phase/scope" and the default category of a new tensor follow them (kept as
    # strings, not formatted per allocation) ------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, phase: str) -> None:
        self._phase = phase
        self._follow()

    @property
    def scope(self) -> str:
        return self._scope

    @scope.setter
    def scope(self, scope: str) -> None:
        if scope != self._scope:
            self._scope = scope
            self._follow()

    def _follow(self) -> None:
        self._segment = f"{self._phase}/{self._scope}"
        kind = "activations" if self._phase in ("forward", "loss") else "temporaries"
        self._default_category = f"{kind}/{self._scope}"

    # Accounting -----------------------------------------------------------------------------------------------
    def _alloc(self, storage: Storage) -> None:
        segment = self._segment
        pending = self._pending
        if pending and self._pending_key != segment:
            self._flush()
            pending = self._pending
        nbytes = storage.nbytes
        current = self.current = self.current + nbytes
        by_category, category = self.by_category, storage.category
        by_category[category] = by_category.get(category, 0) + nbytes
        log = self.allocation_log
        if log is not None and nbytes:  # allocator replay hook (`_log_storage`, inlined for one block)
            if storage.blocks == 1:
                log.append((id(storage), nbytes))
            else:
                _log_storage(log, storage, nbytes)
        if self.detail:
            self.live[id(storage)] = storage
        peaks = self.segment_peaks
        best = peaks.get(segment)
        if best is None or current > best[0]:
            peaks[segment] = (current, None)
            pending.append((peaks, segment, self.segment_blocks))
        phase, peaks = self._phase, self.phase_peaks
        best = peaks.get(phase)
        if best is None or current > best[0]:
            peaks[phase] = (current, None)
            pending.append((peaks, phase, self.phase_blocks))
        if pending:
            self._pending_key = segment

    def _flush(self) -> None:
        """Record the breakdown of the peaks reached since the last free: the current state is their maximum (the
        breakdown is copied once per local maximum, not once per allocation)."""
        for table, key, blocks in self._pending:
            total, breakdown = table[key]
            if breakdown is None and total == self.current:
                table[key] = (total, dict(self.by_category))
                if self.detail:
                    blocks[key] = [(s.category, s.owner, s.nbytes) for s in self.live.values()]
        self._pending = []

    def _free(self, storage: Storage) -> None:
        if self._pending:
            self._flush()
        nbytes = storage.nbytes
        if self.detail:
            self.live.pop(id(storage), None)
        log = self.allocation_log
        if log is not None and nbytes:  # allocator replay hook (`_log_storage`, inlined for one block)
            if storage.blocks == 1:
                log.append((id(storage), 0))
            else:
                _log_storage(log, storage, 0)
        self.current -= nbytes
        self.by_category[storage.category] -= nbytes

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def reset_peaks(self) -> None:
        self.phase_peaks = {}

    # Tensors ----------------------------------------------------------------------------------------------------
    def new(self, numel: int, dtype: str, rg: bool = False, name: str = "", category: str | None = None,
            blocks: int = 1) -> T:
        """A fresh tensor of `numel` elements; `blocks` > 1: that many equal allocations of numel / blocks each."""
        if category is None:
            category = self._default_category
        frame = self.frame
        if frame is not None:  # allocations inside a non-reentrant checkpoint are counted (`_checkpointed`)
            if frame.recomputing and frame.allocs == frame.stop_before:
                raise StopRecompute
            frame.allocs += 1
        storage = Storage(self, numel * DTYPE_BYTES[dtype], category, name, blocks)
        if frame is not None:
            frame.last = weakref.ref(storage)
        return T(numel, dtype, rg and self.grad_enabled, storage, name)

    def param(self, name: str, numel: int, dtype: str, trainable: bool, component: str,
              kind: str = "weights", shape: tuple[int, ...] | None = None) -> Param:
        p = Param(name, numel, dtype, trainable, component, shape=shape)
        kind = self.param_kind or kind
        storage = Storage(self, numel * DTYPE_BYTES[dtype], f"{kind}/{component}", name)
        p.tensor = T(numel, dtype, trainable, storage, name)
        self.params.append(p)
        return p

    def hook_input(self, t: T) -> T:
        """The forward hook `enable_input_require_grads` puts on a sub-model's input embeddings
        (modeling_utils.py `make_inputs_require_grads`: `output.requires_grad_(True)`). On an output that does not
        require grad already, it makes a leaf that requires grad: everything computed from it records a graph, and
        the leaf's AccumulateGrad node holds the tensor, so it and the `.grad` it receives live until the graph is
        freed after backward."""
        if not self.input_grads or t.rg or not self.grad_enabled:
            # under no_grad `requires_grad_(True)` makes a leaf no op records: it dies with its references
            return t
        t.rg = True
        t.node = InputLeaf(t)
        self.kept_until_backward_end.append(t.node)
        return t

    def offload(self, t: T) -> "HostCopy":
        """`t.to("cpu")`: a host copy of `t` (host RAM, not GPU memory), held by whoever keeps the returned copy."""
        return HostCopy(self, t.numel, t.dtype, t.name)

    def record(self, node: Node, out: T) -> None:
        """Attach an autograd node to `out` when grad mode is on and something needs a gradient."""
        if self.grad_enabled and (node.inputs or node.params):
            node.scope = self.scope
            node.inputs = [Edge(t) for t in node.inputs]
            # a node saving its own output keeps only the data (torch's SavedVariable for outputs avoids the cycle)
            node.saved = [t.view() if t is out else t for t in node.saved]
            for t in node.saved:
                if t.storage is out.storage:
                    t.node = None
            out.rg = True
            out.node = node
            node.out_numel, node.out_dtype = out.numel, out.dtype
            if self.frame is not None:
                self._checkpointed(node, out)
                return
            self.tape.append(weakref.ref(node))
        else:
            node.saved.clear()

    def _checkpointed(self, node: Node, out: T) -> None:
        """A node recorded inside a non-reentrant checkpoint (torch/utils/checkpoint.py
        `_checkpoint_without_reentrant_generator`). In the forward its saved tensors are packed as holders (nothing
        kept); in the recompute each packed tensor goes to the holder of the same index, i.e. to the forward node
        recorded in the same order, and the recompute stops once the last one is packed (early stop,
        `_StopRecomputationError`). The generated autograd kernels save inputs before running the op and outputs
        after it, so when the last packing node saves only inputs, the recompute stops before that op allocates
        its output (`stop_before`: the index of that allocation within the layer, found in the forward)."""
        frame = self.frame
        if not frame.recomputing:
            node.deferred = len(node.saved)
            if node.deferred:
                saves_output = any(t.storage is out.storage for t in node.saved)
                last = frame.last() if frame.last is not None else None
                frame.stop_before = frame.allocs - 1 if (last is out.storage and not saves_output) else -1
            node.saved = []
            node.frame = frame
            frame.nodes.append(weakref.ref(node))
            frame.packed += node.deferred
            self.tape.append(weakref.ref(node))
            return
        target = frame.nodes[frame.filled]()
        frame.filled += 1
        frame.unpacked += len(node.saved)
        if target is not None:
            target.saved = node.saved
        node.saved = []
        if frame.unpacked >= frame.packed:
            raise StopRecompute

    # Backward ----------------------------------------------------------------------------------------------------
    def backward(self, loss: T) -> None:
        """Run the tape backwards from `loss`: the memory the autograd engine allocates and releases."""
        self.set_phase("backward")
        refs, self.tape = self.tape, []
        nodes = [node for node in (ref() for ref in refs) if node is not None]
        # torch.autograd.backward holds the ones_like gradient of the loss (`grad_tensors_`) until it returns
        grad_loss = self.new(1, "fp32", name="grad:loss")
        grads = {id(loss.node): grad_loss}
        del loss
        self._run(nodes, grads)
        leftovers, self._param_buffers, self._param_uses = self._param_buffers, {}, {}
        while leftovers:  # uses the loss did not reach: the engine never counted them
            self._accumulate_grad(*leftovers.popitem()[1])
        self.kept_until_backward_end = []  # the graph goes with `loss` after backward
        del grad_loss

    def _run(self, nodes: list[Node], grads: dict) -> None:
        uses: dict[int, int] = {}
        for node in nodes:
            for p in node.params:
                uses[id(p)] = uses.get(id(p), 0) + 1
        self._param_uses.update({key: n for key, n in uses.items() if n > 1})
        while nodes:
            node = nodes.pop()
            out_grad = grads.pop(id(node), None)
            if out_grad is None:
                node.saved.clear()
                node.frame = None
                continue
            self.scope = node.scope
            if node.recompute is not None:
                self._recompute(node, out_grad, grads)
                del out_grad
                continue
            if node.deferred and not node.frame.recomputed:  # the first unpack of a packed tensor
                self._recompute_frame(node.frame)
                self.scope = node.scope
            node.frame = None  # the node's saved variables (and their hooks) go after it runs
            work = self.new(node.workspace // 4, "fp32", name=f"workspace:{node.name}") if node.workspace else None
            given = node.__dict__.pop("param_grads", {})  # gradients handed back as they are (Liger's fused loss)
            for p in node.params:
                self._param_grad(p, node.param_grad_via, given.pop(id(p), None))
            del given
            for index, tensor in enumerate(node.inputs):
                if not tensor.rg:
                    continue
                how = node.grad_dtype.get(index, tensor.dtype)
                if isinstance(how, T):  # a tensor the node computed (or reused) in place: handed back, no allocation
                    grad, how = node.grad_dtype.pop(index), None
                elif how == "passthrough":
                    grad = out_grad
                else:
                    grad = self.new(tensor.numel, how, name=f"grad:{tensor.name}")
                self._accumulate(tensor, grad, grads)
                del grad
            del work
            node.saved.clear()
            node.inputs = []
            del out_grad

    def _accumulate(self, tensor, grad: T, grads: dict) -> None:
        """Store the gradient for `tensor`'s producer; a second one is added in place (InputBuffer::accumulate)."""
        producer = tensor.node
        if isinstance(producer, Leaf):
            producer.receive(self, grad)
            return
        if producer is None:
            return
        key = id(producer)
        if grad.dtype != tensor.dtype:  # the engine casts a gradient to its input's dtype (validate_outputs)
            grad = self.new(tensor.numel, tensor.dtype, name=f"grad:{tensor.name}")
        previous = grads.get(key)
        if previous is None:
            grads[key] = grad
        elif sys.getrefcount(previous) > 3 or sys.getrefcount(previous.storage) > 2:
            # InputBuffer::accumulate sums out of place (`old_var + var`) when the buffered gradient is not its last
            # reference (can_accumulate_inplace): a gradient passed through to another pending input, the incoming
            # gradient a reentrant checkpoint holds for its inner backward, a view. (References counted: the dict,
            # `previous` and getrefcount's argument; the storage: `previous` and the argument.)
            grads[key] = self.new(max(previous.numel, grad.numel), previous.dtype, name=previous.name)
        # else: added into the buffered gradient in place (`old_var.add_(var)`); the new one dies

    def _param_grad(self, p: Param, via: str | None, given: T | None = None) -> None:
        """The weight gradient, computed in `via` (half precision under autocast) and accumulated into `.grad`.

        A parameter used by several nodes of one graph (tied embeddings) has one AccumulateGrad node: the engine
        sums the gradients in its InputBuffer (in place) and runs it once, after the last use, so the first gradient
        is held as a temporary until then and only then added into an existing `.grad`."""
        temp = self.new(p.numel, via, name=f"wgrad:{p.name}") if via and via != p.dtype else None

        def incoming_grad(category: str | None = None) -> T:
            nonlocal given
            if given is not None:
                grad, given = given, None
                return grad
            return self.new(p.numel, p.dtype, name=f"grad:{p.name}", category=category)

        if self.reduce_grads:
            grad = incoming_grad()  # reduced into the IPG bucket, then freed
            del grad, temp
            return
        uses = self._param_uses.get(id(p), 1)
        if uses > 1:
            self._param_uses[id(p)] = uses - 1
            if id(p) not in self._param_buffers:
                self._param_buffers[id(p)] = (p, incoming_grad())
            else:  # InputBuffer::accumulate: `old_var.add_(var)`, the new gradient dies
                extra = incoming_grad()
                del extra
            del temp
            return
        self._param_uses.pop(id(p), None)
        buffered = self._param_buffers.pop(id(p), (None, None))[1]
        category = f"gradients/{p.component}" if p.grad is None and buffered is None else None
        incoming = incoming_grad(category)
        if buffered is not None:  # added into the buffer in place
            del incoming
            incoming = buffered
        del temp, buffered
        self._accumulate_grad(p, incoming)

    def _accumulate_grad(self, p: Param, incoming: T) -> None:
        if p.grad is None:  # AccumulateGrad steals the incoming gradient as `.grad`
            if incoming.storage.category != f"gradients/{p.component}":
                self._recategorize(incoming.storage, f"gradients/{p.component}")
            p.grad = incoming
        # else: AccumulateGrad `variable_grad += new_grad` in place (gradient accumulation); the incoming one dies
        del incoming

    def _recategorize(self, storage: Storage, category: str) -> None:
        if self._pending:
            self._flush()
        self.by_category[storage.category] -= storage.nbytes
        self.by_category[category] = self.by_category.get(category, 0) + storage.nbytes
        storage.category = category

    def _recompute_frame(self, frame: CheckpointFrame) -> None:
        """Non-reentrant recompute, run when backward first unpacks a tensor of the layer: the layer's forward again
        under grad mode and the forward's autocast state (a fresh weight-cast cache), its packed tensors handed to
        the forward's nodes (`_checkpointed`), stopped early after the last one; the recompute's own graph and
        output are dropped."""
        frame.recomputed = True
        frame.allocs = 0
        outer = (self.tape, self.grad_enabled, self.cast_cache, self.autocast, self.frame, self.scope)
        self.tape, self.grad_enabled, self.cast_cache, self.autocast, self.frame = [], True, {}, frame.autocast, frame
        frame.recomputing = True
        try:
            frame.run(frame.x)
        except StopRecompute:
            pass
        finally:
            frame.recomputing = False
            self.tape, self.grad_enabled, self.cast_cache, self.autocast, self.frame, self.scope = outer

    def _recompute(self, node: Node, out_grad: T, grads: dict) -> None:
        """Reentrant activation checkpointing: re-run the segment with grad enabled (and a fresh autocast cast
        cache), then back-propagate through it (torch.utils.checkpoint.CheckpointFunction.backward)."""
        offloaded = getattr(node, "offloaded", None)
        if offloaded is not None:  # UnslothGradientCheckpointing.backward: `hidden_states.to("cuda").detach()`
            x = self.new(offloaded.numel, offloaded.dtype, name=f"{offloaded.name}:to_cuda")
            x.node = node.inputs[0].node
            node.offloaded = None
            del offloaded
        else:
            x = node.saved[0]
        leaf = x.view(name=f"{x.name}:detached")
        leaf.rg = True
        leaf.node = Leaf(x, grads)
        outer, self.tape = self.tape, []
        was_grad, was_cache, was_autocast = self.grad_enabled, self.cast_cache, self.autocast
        # torch.utils.checkpoint re-enters the forward's autocast state (with a fresh weight-cast cache)
        self.grad_enabled, self.cast_cache, self.autocast = True, {}, node.autocast
        out = node.recompute(leaf)
        sub_nodes = [n for n in (ref() for ref in self.tape) if n is not None]
        # CheckpointFunction keeps ctx.run_function (the layer's keyword arguments: masks, RoPE tables, position ids)
        # until the autograd graph is freed after backward, not just until its own backward runs
        self.kept_until_backward_end.append(node.recompute)
        node.recompute = None
        self.cast_cache, self.grad_enabled, self.autocast = was_cache, was_grad, was_autocast
        self.tape = outer
        node.saved.clear()
        del x
        if out.node is None:
            return
        sub_grads = {id(out.node): out_grad}
        # CheckpointFunction.backward holds the recomputed outputs, the incoming gradients (`args`) and the detached
        # inputs until torch.autograd.backward(outputs, args) returns
        self._run(sub_nodes, sub_grads)
        del out, out_grad, leaf


class LogEngine(Engine):
    """An Engine for the caching-allocator replay alone: it logs every allocation and free (always, as under
    `recording_allocations`) and keeps the live-tensor peak of the step's phases (`live_peak`: the largest of
    `phase_peaks` outside "setup"), not the per-phase and per-segment peaks or their breakdowns. The same program
    runs, so the log is the one an Engine records (tests/test_allocator_fast.py)."""

    def __init__(self, detail: bool = False) -> None:
        super().__init__(detail)
        if self.allocation_log is None:
            self.allocation_log = []
        self.live_peak = 0

    def _alloc(self, storage: Storage) -> None:
        nbytes = storage.nbytes
        current = self.current = self.current + nbytes
        by_category, category = self.by_category, storage.category
        by_category[category] = by_category.get(category, 0) + nbytes
        if nbytes:
            if storage.blocks == 1:
                self.allocation_log.append((id(storage), nbytes))
            else:
                _log_storage(self.allocation_log, storage, nbytes)
        if self.detail:
            self.live[id(storage)] = storage
        if current > self.live_peak and self._phase != "setup":
            self.live_peak = current


class HostCopy:
    """A tensor copied to host RAM: counted in the engine's host bytes (not GPU memory) while it lives."""

    def __init__(self, engine: Engine, numel: int, dtype: str, name: str) -> None:
        self.engine, self.numel, self.dtype, self.name = engine, numel, dtype, name
        self.nbytes = numel * DTYPE_BYTES[dtype]
        engine.host_bytes += self.nbytes
        engine.host_peak_bytes = max(engine.host_peak_bytes, engine.host_bytes)

    def __del__(self) -> None:
        self.engine.host_bytes -= self.nbytes


class StopRecompute(Exception):
    """torch.utils.checkpoint `_StopRecomputationError`: the recompute has packed every tensor the forward did."""


class CheckpointFrame:
    """One non-reentrant checkpoint call (torch.utils.checkpoint `_CheckpointFrame`): the layer's input (a saved
    tensor of the frame, `save_inputs`) and its keyword arguments (the `partial` the recompute calls) live as long as
    a node of the layer's graph still holds a packed tensor (its unpack hook holds the frame), i.e. until the layer's
    backward is done."""

    def __init__(self, x: T, run, autocast: str | None) -> None:
        self.x, self.run, self.autocast = x, run, autocast
        self.nodes: list = []  # weak references to the forward nodes, in recording order
        self.packed = self.unpacked = self.filled = 0
        self.allocs, self.stop_before, self.last = 0, -1, None  # see Engine._checkpointed
        self.recomputing = self.recomputed = False


class Leaf:
    """Stands in for a checkpointed segment's detached input: its gradient goes to the real input's producer."""

    def __init__(self, target: T, grads: dict) -> None:
        self.target, self.grads = target, grads
        self.grad = None

    def receive(self, engine: Engine, grad: T) -> None:
        if self.target.node is None and self.grad is None:
            # the detached input's .grad (AccumulateGrad; later gradients are added in place) lives until
            # CheckpointFunction.backward returns it, also when the real input has no producer to pass it to (the
            # first layer's inputs_embeds under LoRA)
            self.grad = grad
        engine._accumulate(self.target, grad, self.grads)


class InputLeaf(Leaf):
    """A leaf made to require grad by `enable_input_require_grads` (see `Engine.hook_input`): its AccumulateGrad keeps
    the tensor's storage, steals the first gradient (cast to the leaf's dtype by the engine's validate_outputs) as
    `.grad` and adds later ones in place."""

    def __init__(self, target: T) -> None:
        self.storage, self.numel, self.dtype, self.name = target.storage, target.numel, target.dtype, target.name
        self.grad = None

    def receive(self, engine: Engine, grad: T) -> None:
        if grad.dtype != self.dtype:
            grad = engine.new(self.numel, self.dtype, name=f"grad:{self.name}")
        if self.grad is None:
            self.grad = grad
