"""The heaviest micro-batch first: one real training step on it before training, then everything put back.

An out-of-memory error on one large image hours into a run (torchtune #1965, Qwen-VL-Series-Finetune #88) surfaces
here at step 0, with the OOM report of planner/oom.py. At the Trainer's `on_train_begin` (the optimizer, scheduler and
grad scaler exist, the model is wrapped, a resumed run has loaded its checkpoint) the probe:

1. picks the `batch_size` heaviest kept samples (planner/heaviest.py: ranked by the estimate, from each sample's
   exact token count and image sizes) and collates them with the run's own collator;
2. saves what a step changes: the trainable parameters, the optimizer's state and the scheduler's (copied to the
   CPU, so the copies take no GPU memory), the grad scaler's, and the Python, NumPy, torch and CUDA random states;
3. runs the Trainer's own step on that batch (`training_step`: forward and backward under the run's autocast and
   loss scaling, gradient clipping, `optimizer.step`, `zero_grad`); when the optimizer holds no state yet (a fresh
   run: torch creates Adam's states at the first step) it runs two, because every later step's forward and backward
   run with those states allocated;
4. loads everything back, so the first real step is the step the run would have taken without the probe.

Measured: on a GPU the allocator's peaks (`max_memory_allocated` / `max_memory_reserved` after resetting them at the
probe's start; the run's own measured peaks then cover the probe and the training); on the CPU the live-tensor peak
of the step (profiler/memtrack.py's tracker: every storage, in the CUDA allocator's 512-byte blocks), i.e. what
`memory_allocated` would show. Each rank of a multi-process run probes the same batch; the record holds the
largest peak over the ranks. The estimate beside it is the setup's with the heaviest sample's images and length
for each of the `batch_size` samples (how `vlplan plan --dataset` plans).

vlplan run does not pack sequences (each micro-batch is padded to its longest sample), so its heaviest micro-batch is
made of its heaviest samples; a packing data path would make it the fullest pack.

Not probed: DeepSpeed runs (ZeRO's partitioned optimizer and its engine state are not put back exactly by an
in-memory copy; the record says the probe was skipped and why).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace

import torch

from vlplan.planner.heaviest import RankedSample, SampleLoad, heaviest_samples
from vlplan.planner.image_header import image_size
from vlplan.planner.memory.estimate import estimate


def dataset_loads(dataset) -> list[SampleLoad]:
    """The load of each kept sample of a runner.data.SupervisedDataset: its exact sequence length and image tokens
    (the encoder's ids), its images' stored sizes (file headers). `index` is the position in the dataset."""
    encoder = dataset.encoder
    image_id = encoder.tokenizer.convert_tokens_to_ids(encoder.image_token)
    sizes: dict[str, tuple[int, int]] = {}
    loads = []
    for position, item in enumerate(dataset.items):
        for path in item.images:
            if path not in sizes:
                sizes[path] = image_size(path)
        loads.append(SampleLoad(position, len(item.input_ids), sum(1 for t in item.input_ids if t == image_id),
                                tuple(sizes[p] for p in item.images)))
    return loads


class Snapshot:
    """What one training step changes, copied to the CPU; `restore` puts it back exactly."""

    def __init__(self, trainer):
        self.trainer = trainer
        model = trainer.model
        self.params = [(p, p.detach().to("cpu", copy=True)) for p in model.parameters() if p.requires_grad]
        self.buffers = [(b, b.detach().to("cpu", copy=True)) for b in model.buffers()]
        self.optimizer = _to_cpu(trainer.optimizer.state_dict())
        self.scheduler = _to_cpu(trainer.lr_scheduler.state_dict()) if trainer.lr_scheduler is not None else None
        scaler = getattr(trainer.accelerator, "scaler", None)
        self.scaler = scaler.state_dict() if scaler is not None else None
        self.rng = (random.getstate(), _numpy_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def restore(self) -> None:
        trainer = self.trainer
        with torch.no_grad():
            for tensor, saved in self.params + self.buffers:
                tensor.copy_(saved)
        trainer.model.zero_grad(set_to_none=True)  # the Trainer zeroes them before on_train_begin
        trainer.optimizer.load_state_dict(self.optimizer)  # torch puts each state on its parameter's device
        if self.scheduler is not None:
            trainer.lr_scheduler.load_state_dict(self.scheduler)
        if self.scaler is not None:
            trainer.accelerator.scaler.load_state_dict(self.scaler)
        python, numpy_state, cpu, cuda = self.rng
        random.setstate(python)
        if numpy_state is not None:
            import numpy

            numpy.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _numpy_state():
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random.get_state()


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    import copy

    return copy.deepcopy(value)


def _optimizer_has_state(optimizer) -> bool:
    return any(bool(state) for state in optimizer.state_dict().get("state", {}).values())


class Probe:
    """The probe of one run: `run(trainer)` returns the record's "probe" entry; `running` is true while the probe's
    step runs (an out-of-memory error then is the probe's)."""

    def __init__(self, setup, dataset, collator, run_state, on_event=lambda kind, data: None, main: bool = True):
        self.setup = setup
        self.dataset = dataset
        self.collator = collator
        self.run_state = run_state
        self.on_event = on_event
        self.main = main
        self.running = False
        self.entry: dict | None = None

    def choose(self) -> tuple[list, str]:
        """The heaviest samples and how they were ranked: by the estimate, or (when the planner cannot estimate this
        model) by tokens, then vision tokens."""
        loads = dataset_loads(self.dataset)
        count = min(self.setup.batch_size, len(self.dataset))
        try:
            return (heaviest_samples(self.setup, loads, count),
                    "estimated peak with each sample alone at micro-batch 1 (planner/heaviest.py)")
        except Exception as err:  # noqa: BLE001 (a model the estimator does not cover still gets probed)
            ranked = sorted(loads, key=lambda s: (-s.tokens, -s.vision_tokens, s.index))[:count]
            why = str(err).splitlines()[0] if str(err) else repr(err)
            return [RankedSample(load, None) for load in ranked], f"tokens, then vision tokens (no estimate: {why})"

    def run(self, trainer) -> dict:
        if trainer.is_deepspeed_enabled:
            self.entry = {"skipped": "DeepSpeed ZeRO: its partitioned optimizer and engine state are not restored "
                                     "exactly by an in-memory copy, so the heaviest-batch probe does not run"}
            return self.entry
        ranked, ranked_by = self.choose()
        positions = [r.load.index for r in ranked]
        heaviest = ranked[0].load
        try:
            planned = estimate(replace(self.setup, images=heaviest.images, seq_len=max(heaviest.tokens, 1)))
        except Exception:  # noqa: BLE001 (a setup the planner refuses for this sample: the probe still runs)
            planned = None
        self.entry = {
            "samples": [self.dataset.items[p].index for p in positions],
            "tokens": [len(self.dataset.items[p].input_ids) for p in positions],
            "images": [[f"{w}x{h}" for w, h in r.load.images] for r in ranked],
            "ranked_by": ranked_by,
            "estimate_peak_bytes": planned.peak_bytes if planned else None,
            "estimate_allocated_peak_bytes": planned.allocated_peak_bytes if planned else None,
            "status": "running",
        }
        if self.main:
            self.on_event("note", {"message": f"probing the heaviest micro-batch first: sample(s) "
                                              f"{', '.join('#' + str(i) for i in self.entry['samples'])} "
                                              f"({max(self.entry['tokens'])} tokens)"})
        batch = self.collator([self.dataset[p] for p in positions])
        snapshot = Snapshot(trainer)
        steps = 1 if _optimizer_has_state(trainer.optimizer) else 2
        self.running = True
        with _measure(trainer, self.setup) as measured:
            losses = [self._step(trainer, batch, measured.get("tracker")) for _ in range(steps)]
        self.running = False
        snapshot.restore()
        self.run_state.phase = "forward"
        peaks = _reduce_max(measured["peaks"])
        self.entry.update(status="done", steps=steps, losses=losses, **peaks)
        allocated = peaks.get("max_memory_allocated_bytes") or peaks.get("live_tensor_peak_bytes")
        if planned and allocated:
            self.entry["relative_error_allocated"] = round((allocated - planned.allocated_peak_bytes)
                                                           / planned.allocated_peak_bytes, 4)
        return self.entry

    def _step(self, trainer, batch: dict, tracker) -> float:
        """The Trainer's step on `batch` (transformers Trainer._inner_training_loop: training_step, clipping,
        optimizer.step, zero_grad), with every gradient synchronised (an optimizer step)."""
        model = trainer.model_wrapped
        trainer.accelerator.gradient_state._set_sync_gradients(True)
        num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
        original = trainer.compute_loss

        def compute_loss(*args, **kwargs):  # the tracker's phases follow the step's (activations vs temporaries)
            if tracker is not None:
                tracker.phase = "forward"
            loss = original(*args, **kwargs)
            if tracker is not None:
                tracker.phase = "backward"
            return loss

        had_steps = "current_gradient_accumulation_steps" in vars(trainer)
        previous_steps = vars(trainer).get("current_gradient_accumulation_steps")
        # the loop sets it to the micro-batches of the optimizer step (training_step divides the loss by it)
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
        trainer.compute_loss = compute_loss
        try:
            loss = trainer.training_step(model, dict(batch), num_items)
        finally:
            del trainer.compute_loss  # the class's method again
            if had_steps:
                trainer.current_gradient_accumulation_steps = previous_steps
            else:
                del trainer.current_gradient_accumulation_steps
        self.run_state.phase = "optimizer"
        if tracker is not None:
            tracker.phase = "optimizer"
        if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
            trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        model.zero_grad()
        if tracker is not None:
            tracker.phase = "after"
        self.run_state.phase = "forward"
        return float(loss.detach().float().item())

    def annotate_oom(self, report: dict) -> dict:
        """The OOM report of an error in the probe's step: it names the heaviest batch."""
        samples = ", ".join("#" + str(i) for i in (self.entry or {}).get("samples", []))
        if self.entry is not None:
            self.entry["status"] = "oom"
        return dict(report, probe=True, message=f"the heaviest-batch probe at step 0 (sample(s) {samples}): "
                                                 f"{report['message']}")


@contextlib.contextmanager
def _measure(trainer, setup):
    """Yields a dict whose "peaks" holds the probe's measured peaks once the block ends (and "tracker" the CPU
    tracker while it runs)."""
    out: dict = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out["peaks"] = {"device": torch.cuda.get_device_name(),
                        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
                        "max_memory_reserved_bytes": torch.cuda.max_memory_reserved()}
        return
    from vlplan.profiler.memtrack import MemoryTracker

    tracker = MemoryTracker()
    model = trainer.model
    with tracker:
        for param in model.parameters():
            tracker.track(param, "weights")
        for buffer in model.buffers():
            tracker.track(buffer, "weights")
        for state in trainer.optimizer.state.values():
            for value in state.values():
                tracker.track(value, "optimizer")
        tracker.phase = "forward"
        out["tracker"] = tracker
        yield out
        snap = tracker.peak
    out.pop("tracker")
    out["peaks"] = {"device": "cpu", "live_tensor_peak_bytes": snap.total_bytes, "peak_phase": snap.phase,
                    "peak_by_category_bytes": dict(snap.by_category)}


def _reduce_max(peaks: dict) -> dict:
    """The largest of each byte count over the ranks (every rank probes the same batch)."""
    keys = [k for k, v in peaks.items() if k.endswith("_bytes") and isinstance(v, int)]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or not keys:
        return peaks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = torch.tensor([peaks[k] for k in keys], dtype=torch.long, device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return {**peaks, **dict(zip(keys, (int(v) for v in values.tolist()))),
            "ranks": torch.distributed.get_world_size()}


def make_probe_callback(trainer, probe: Probe, record: dict, write_record):
    """A TrainerCallback that runs the probe at on_train_begin and puts its entry into the run record."""
    from transformers import TrainerCallback

    class HeaviestBatchFirst(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["probe"] = probe.entry
            try:
                record["probe"] = probe.run(trainer)
            finally:
                if probe.entry is not None and probe.entry.get("status") == "running":
                    probe.entry["status"] = "failed"
                record["probe"] = probe.entry
            write_record("running")

    return HeaviestBatchFirst()
