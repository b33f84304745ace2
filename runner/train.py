"""One training process: the transformers Trainer on the model `profiler.build.prepare_model` prepares.

What the planner estimated is what runs here: the model is loaded in the setup's compute dtype with its attention
kernel, `prepare_model` freezes per component, wraps LoRA/DoRA with peft, upcasts trainable parameters and turns on
LLaMA-Factory's gradient checkpointing (so the Trainer is told not to turn it on again), and the training arguments
carry the setup's micro-batch, accumulation, precision, optimizer and DeepSpeed config.

The process keeps a record (`OUT/vlplan_run.json`: plan, estimate, settings, per-step losses, steps, measured CUDA
peaks) and its safety rules: checkpoints are written to a staging directory and renamed into place; SIGINT/SIGTERM
finish the current step, save a checkpoint and stop; a CUDA out-of-memory error is reported with the phase it hit,
the estimate's term that was too low and the next setup to try.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.io.files import write_json_atomic
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.oom import oom_report
from vlplan.planner.setup import TrainSetup

from .job import RunOptions
from .record import (CHECKPOINT_PATTERN, OOM_REPORT_NAME, RECORD_NAME, STAGING_NAME, STATE_DIR, fsync_dir,
                     last_checkpoint, measured_peaks, nvml_used_bytes, read_record)


class Interrupted(Exception):
    """SIGINT/SIGTERM before training started: nothing to save."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunOutOfMemory(Exception):
    """CUDA ran out of memory; `report` says where, why and what to try next."""

    def __init__(self, report: dict):
        super().__init__(report["message"])
        self.report = report


# Model --------------------------------------------------------------------------------------------------------------
def load_model(setup: TrainSetup, options: RunOptions):
    """The run's transformers model, loaded by `profiler.build.load_model` (the one loader of run and profile): the
    directory's checkpoint, or with `--random-init` random weights from the directory's or the registry's config."""
    from vlplan.profiler.build import load_model as build_load_model

    path = Path(options.model)
    random_spec = random_init_spec(setup) if options.random_init and not path.is_dir() else None
    return build_load_model(setup, path, random_init=options.random_init, config_spec=random_spec)


def random_init_spec(setup: TrainSetup):
    """A registry model built from its config for --random-init: the family's tiny tokenizer names the special
    tokens, so the config's image token id is the tokenizer's."""
    from .tiny import image_token_of, make_tokenizer, tiny_family_for

    family = tiny_family_for(setup.model)
    tokenizer = make_tokenizer(family)
    return replace(setup.model, image_token_id=tokenizer.convert_tokens_to_ids(image_token_of(family)))


def load_processor_for(setup: TrainSetup, options: RunOptions):
    from .processor import load_processor

    path = Path(options.model)
    if path.is_dir():
        return load_processor(path, setup.model.family)
    if not options.random_init:
        raise VlplanError(f"--model {options.model} is not a local directory; download the checkpoint (e.g. "
                          f"`huggingface-cli download {setup.model.hf_id} --local-dir DIR`) and pass DIR, or pass "
                          "--random-init to train random weights of its architecture")
    from .tiny import make_processor, make_tokenizer, tiny_family_for

    family = tiny_family_for(setup.model)
    return make_processor(family, random_init_spec(setup), make_tokenizer(family))


# Trainer ------------------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """What the callbacks share with the trainer and the record."""

    phase: str = "load"
    signal: int | None = None
    training: bool = False
    losses: list[dict] = field(default_factory=list)
    nvml_peak_bytes: int = 0
    start_bytes: int | None = None  # CUDA memory allocated when training begins (before the first step)


def make_trainer_class():
    """The HF Trainer with atomic checkpoints and phase tracking (built lazily: transformers imports are slow)."""
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class VlplanTrainer(Trainer):
        run_state: RunState
        _staging: Path | None = None

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.run_state.phase = "forward"
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.run_state.phase = "backward"  # Trainer.training_step calls backward right after
            return loss

        def _get_output_dir(self, trial):
            return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            """Write the checkpoint into OUT/.vlplan/staging, then rename it to OUT/checkpoint-N (atomic on one
            filesystem): a checkpoint-N directory is always complete."""
            out = Path(self.args.output_dir)
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staging = out / STATE_DIR / STAGING_NAME
            if self.args.should_save and (staging / name).exists():
                shutil.rmtree(staging / name)  # a save this run began and never finished
            self.accelerator.wait_for_everyone()
            self._staging = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                final = out / name
                if final.exists():
                    shutil.rmtree(final)  # the same step saved by an earlier attempt of this run
                os.replace(staging / name, final)
                fsync_dir(out)
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=str(out), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=None, use_mtime=False)
            self.accelerator.wait_for_everyone()

    return VlplanTrainer


def make_callbacks(state: RunState, on_event, write_record):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Per-step losses into the record; phase tracking; CUDA memory sampling."""

        def on_train_begin(self, args, train_state, control, **kwargs):
            state.training = True
            state.phase = "forward"
            if torch.cuda.is_available():
                state.start_bytes = torch.cuda.memory_allocated()

        def on_pre_optimizer_step(self, args, train_state, control, **kwargs):
            state.phase = "optimizer"

        def on_optimizer_step(self, args, train_state, control, **kwargs):
            state.phase = "forward"

        def on_step_end(self, args, train_state, control, **kwargs):
            if torch.cuda.is_available():
                state.nvml_peak_bytes = max(state.nvml_peak_bytes, nvml_used_bytes() or 0)

        def on_log(self, args, train_state, control, logs=None, **kwargs):
            if logs and "loss" in logs and train_state.is_world_process_zero:
                entry = {"step": train_state.global_step, "loss": logs["loss"]}
                for key in ("learning_rate", "grad_norm"):
                    if key in logs:
                        entry[key] = logs[key]
                state.losses.append(entry)
                on_event("step", dict(entry, max_steps=train_state.max_steps))

        def on_save(self, args, train_state, control, **kwargs):
            if train_state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{train_state.global_step}"
                write_record("running", checkpoint=str(checkpoint))
                on_event("checkpoint", {"path": str(checkpoint), "step": train_state.global_step})

    class StopOnSignal(TrainerCallback):
        """SIGINT/SIGTERM: finish the step, save a checkpoint, stop. All ranks agree on the step to stop at."""

        def on_step_end(self, args, train_state, control, **kwargs):
            requested = torch.tensor([state.signal or 0], device=args.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX)
            if requested.item():
                state.signal = state.signal or int(requested.item())
                control.should_save = True
                control.should_training_stop = True
            return control

    return [Progress(), StopOnSignal()]


def training_arguments(setup: TrainSetup, options: RunOptions):
    """transformers TrainingArguments: the setup's own keys (planner.io.hf_args) and the run's."""
    from transformers import TrainingArguments

    from vlplan.planner.io.deepspeed import deepspeed_config
    from vlplan.planner.io.hf_args import training_arguments as setup_arguments
    from vlplan.planner.setup import HF_OPTIM

    cuda = torch.cuda.is_available()
    args = setup_arguments(setup, output_dir=str(options.output_path))
    args.pop("deepspeed", None)
    # build.prepare_model already turned on LLaMA-Factory's checkpointing (trainable layers only); the Trainer would
    # wrap every layer again with its own: leave its switch at the default (off)
    args.pop("gradient_checkpointing", None)
    args.pop("gradient_checkpointing_kwargs", None)
    args.update(
        optim=HF_OPTIM[setup.optimizer],
        learning_rate=options.learning_rate_for(setup),
        lr_scheduler_type=options.lr_scheduler_type,
        # transformers 5 folded warmup_ratio into warmup_steps (a float in [0, 1) is a ratio of the total steps);
        # warmup_steps wins over warmup_ratio, as in HF TrainingArguments.get_warmup_steps
        warmup_steps=options.warmup_steps or options.warmup_ratio,
        logging_steps=options.logging_steps,
        save_strategy=options.save_strategy,
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        data_seed=options.seed,
        disable_tqdm=True,
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    if options.max_steps is not None:
        args["max_steps"] = options.max_steps
    else:
        args["num_train_epochs"] = options.epochs
    if not cuda and setup.world_size > 1:
        args["ddp_backend"] = "gloo"
    if setup.zero > 0:
        args["deepspeed"] = deepspeed_config(setup)
    try:
        return TrainingArguments(**args)
    except (ValueError, ImportError) as err:
        raise VlplanError(f"transformers refuses the training arguments: {str(err).strip().splitlines()[0]}") from None


# The run ------------------------------------------------------------------------------------------------------------
def train(setup: TrainSetup, options: RunOptions, on_event=lambda kind, data: None) -> dict:
    """Train in this process (one rank of a launch, or the only process) and return the run record.

    Raises Interrupted (a signal before training started) and RunOutOfMemory (CUDA OOM, after writing the report).
    """
    import transformers
    from transformers.trainer_callback import PrinterCallback

    from vlplan.planner.dataset import read_dataset
    from vlplan.profiler.build import prepare_model

    from .data import Collator, SupervisedDataset

    state = RunState()
    out = options.output_path
    rank = int(os.environ.get("RANK", "0"))
    main = rank == 0
    resume_from = last_checkpoint(out) if options.resume else None
    previous = read_record(out) if options.resume else None
    result = estimate(setup)
    started = time.time()
    record = {
        "status": "running", "model": options.model, "dataset": options.dataset, "output_dir": str(out),
        "plan": options.plan, "estimate": result.to_dict(), "settings": setup.describe(),
        "run": {"learning_rate": options.learning_rate_for(setup), "cutoff_len": options.cutoff_for(setup),
                "max_steps": options.max_steps,
                "epochs": None if options.max_steps else options.epochs, "seed": options.seed,
                "lr_scheduler_type": options.lr_scheduler_type, "warmup_ratio": options.warmup_ratio,
                "warmup_steps": options.warmup_steps, "logging_steps": options.logging_steps,
                "save_strategy": options.save_strategy, "save_steps": options.save_steps,
                "save_total_limit": options.save_total_limit, "max_samples": options.max_samples,
                "random_init": options.random_init, "smoke_test": options.smoke_test,
                "world_size": setup.world_size},
        "losses": [], "steps": 0, "checkpoint": None, "resumed_from": str(resume_from) if resume_from else None,
        "measured": None, "warnings": [], "oom": None, "probe": None,
    }
    kept_losses: list[dict] = []
    if previous and resume_from is not None:
        step = int(CHECKPOINT_PATTERN.match(resume_from.name).group(1))
        kept_losses = [e for e in previous.get("losses", []) if e.get("step", 0) <= step]
        if previous.get("retries"):
            record["retries"] = previous["retries"]

    def write_record(status: str, **changes) -> None:
        if not main:
            return
        record.update(status=status, losses=_merged(kept_losses, state.losses),
                      elapsed_s=round(time.time() - started, 3), **changes)
        write_json_atomic(out / RECORD_NAME, record)

    previous_handlers = {}

    def on_signal(signum, frame):
        if not state.training:
            raise Interrupted(signum)
        if state.signal:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        state.signal = signum
        if main:
            on_event("note", {"message": f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                                         "(send it again to stop now, without one)"})

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous_handlers[signum] = signal.signal(signum, on_signal)
    trainer = None
    try:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        args = training_arguments(setup, options)  # before the model: ZeRO-3 partitions weights as they load
        processor = load_processor_for(setup, options)
        samples = read_dataset(options.dataset, dataset_dir=options.dataset_dir, media_dir=options.media_dir,
                               dataset_info=options.dataset_info)[:options.max_samples]  # LF max_samples
        dataset = SupervisedDataset(samples, processor, setup, options.cutoff_for(setup))
        record["dataset_stats"] = dataset.stats.to_dict()
        if main:
            on_event("dataset", dataset.stats.to_dict())
        write_record("running")
        # the seed before any weights exist: random init, LoRA's A matrices (the Trainer seeds only later)
        transformers.set_seed(options.seed)
        model = load_model(setup, options)
        model = prepare_model(model, setup)
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        trainer = make_trainer_class()(model=model, args=args, data_collator=Collator(pad), train_dataset=dataset,
                                       callbacks=make_callbacks(state, on_event, write_record))
        trainer.run_state = state
        trainer.remove_callback(PrinterCallback)
        probe = None
        if options.probe:  # the heaviest micro-batch's step first (runner/probe.py), at on_train_begin
            from .probe import Probe, make_probe_callback

            probe = Probe(setup, dataset, trainer.data_collator, state, on_event, main)
            trainer.add_callback(make_probe_callback(trainer, probe, record, write_record))
        if resume_from is not None and _steps_of(resume_from) >= total_steps(trainer):
            return _already_trained(trainer, processor, resume_from, record, previous, write_record, on_event, main)
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except torch.OutOfMemoryError as err:
            report = oom_report(setup, result, state.phase, err, state.start_bytes)
            if probe is not None and probe.running:
                report = probe.annotate_oom(report)
                record["probe"] = probe.entry
            record["oom"] = report
            record["steps"] = trainer.state.global_step
            write_record("oom")
            (out / STATE_DIR).mkdir(exist_ok=True)
            write_json_atomic(out / STATE_DIR / OOM_REPORT_NAME, report)
            raise RunOutOfMemory(report) from None
        record["steps"] = trainer.state.global_step
        record["run"]["processes"] = trainer.args.world_size
        record["checkpoint"] = str(last_checkpoint(out)) if main and last_checkpoint(out) else None
        record["measured"] = measured_peaks(result, record["warnings"], state.nvml_peak_bytes)
        if state.signal:
            write_record("interrupted", signal=signal.Signals(state.signal).name)
            if main:
                on_event("interrupted", {"signal": signal.Signals(state.signal).name, "step": record["steps"],
                                         "checkpoint": record["checkpoint"]})
            return record
        save_final(trainer, processor, out)
        write_record("completed")
        return record
    except Interrupted as err:  # before the first step: the record says so (and that there is no checkpoint)
        write_record("interrupted", signal=signal.Signals(err.signum).name)
        raise
    except RunOutOfMemory:
        raise
    except KeyboardInterrupt:  # a second signal: stopped at once, without a checkpoint
        write_record("interrupted", signal=signal.Signals(state.signal or signal.SIGINT).name)
        raise
    except Exception as err:
        write_record("failed", error=_first_line(err))
        raise
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if trainer is not None:
            del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines and not isinstance(err, VlplanError) else \
        (lines[0] if lines else type(err).__name__)


def _steps_of(checkpoint: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def total_steps(trainer) -> int:
    """The optimizer steps this run trains to, counted by the Trainer itself (max_steps, or the epochs over its
    dataloader: Trainer.set_initial_training_values)."""
    if trainer.args.max_steps > 0:
        return trainer.args.max_steps
    values = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())
    return values[-1]


def _already_trained(trainer, processor, checkpoint: Path, record: dict, previous: dict | None, write_record,
                     on_event, main: bool) -> dict:
    """--resume of a run whose last checkpoint already reached the steps asked for: train nothing (the Trainer
    would take one more step before checking). A completed run stays as it is; a run stopped at its last step gets
    its final weights from that checkpoint."""
    step = _steps_of(checkpoint)
    completed = previous is not None and previous.get("status") == "completed"
    if completed or trainer.is_deepspeed_enabled:
        message = (f"the run in {checkpoint.parent} is complete ({step} steps); nothing to train (pass a larger "
                   "--max-steps or --epochs to train further)" if completed else
                   f"{checkpoint} already holds all {step} steps; nothing to train (its DeepSpeed checkpoint holds the "
                   "trained weights: deepspeed's zero_to_fp32.py converts them)")
        if main:
            if previous is not None:
                write_json_atomic(checkpoint.parent / RECORD_NAME, previous)  # as it was before this resume
            on_event("note", {"message": message})
        return previous or record
    trainer._load_from_checkpoint(str(checkpoint))  # the HF Trainer's own loader of a checkpoint's weights
    record["steps"] = step
    record["checkpoint"] = str(checkpoint)
    if main:
        on_event("note", {"message": f"{checkpoint} already holds all {step} steps; saving its weights as the "
                                     "trained model"})
    save_final(trainer, processor, checkpoint.parent)
    write_record("completed")
    return record


def _merged(old: list[dict], new: list[dict]) -> list[dict]:
    steps = {e["step"] for e in new}
    return [e for e in old if e["step"] not in steps] + list(new)


def save_final(trainer, processor, out: Path) -> None:
    """The trained weights (LoRA: the adapter; else the model) and the processor files, into the output directory;
    each file is written to the staging area and renamed into place."""
    from .processor import save_processor

    staging = out / STATE_DIR / STAGING_NAME / "final"
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if trainer.args.should_save:
        save_processor(processor, staging)
        for path in sorted(staging.iterdir()):
            target = out / path.name
            if path.is_dir() and target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
        for done in (staging, staging.parent, staging.parent.parent):  # the staging area, once empty
            try:
                done.rmdir()
            except OSError:
                break
        fsync_dir(out)
    trainer.accelerator.wait_for_everyone()


