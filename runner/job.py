"""A run: the TrainSetup plus what only a launch needs (data, output, steps, learning rate, seed, safety switches).

The launcher hands a job to each process it starts as JSON (`VLPLAN_JOB`), and a saved plan's settings come back
as a TrainSetup, both through `setup_from_settings`, the inverse of `TrainSetup.describe()`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vlplan.planner.errors import VlplanError
from vlplan.planner.hardware import custom_gpu, find_gpu
from vlplan.planner.setup import LoraSettings, OftSettings, Train, TrainSetup
from vlplan.planner.spec import ModelSpec
from vlplan.planner.tokens import parse_size

JOB_ENV = "VLPLAN_JOB"  # the job of a launched worker process, as JSON
LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
# LLaMA-Factory's example learning rates (examples/train_lora/*.yaml 1.0e-4, examples/train_full/*.yaml 1.0e-5); OFT
# takes the adapter rate of the LoRA examples (an assumption: no OFT example was checked)
DEFAULT_LEARNING_RATE = {"lora": 1e-4, "qlora": 1e-4, "oft": 1e-4, "full": 1e-5, "freeze": 1e-5}
DEFAULT_EPOCHS = 3.0  # LLaMA-Factory's examples and HF TrainingArguments.num_train_epochs
SMOKE_TEST_STEPS = 3
# transformers trainer_utils.SchedulerType (5.x; "greedy" needs a metric and is left out) and SaveStrategy ("best"
# needs an evaluation, which vlplan run does not do); tests/test_runner.py holds these to the installed enums
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay")
SAVE_STRATEGIES = ("steps", "epoch", "no")


@dataclass(frozen=True)
class RunOptions:
    """Everything about a run that is not the TrainSetup."""

    model: str  # a local model directory, or a registry name with random_init
    dataset: str  # a dataset file or folder, or a name in dataset_info
    output_dir: str
    cutoff_len: int | None = None  # samples longer are dropped; None: the setup's seq_len
    dataset_dir: str | None = None
    media_dir: str | None = None
    dataset_info: str | None = None
    max_samples: int | None = None  # LLaMA-Factory max_samples: only the first N samples; None: all
    max_steps: int | None = None  # None: train `epochs` epochs
    epochs: float = DEFAULT_EPOCHS
    learning_rate: float | None = None  # None: LLaMA-Factory's example rate for the method
    lr_scheduler_type: str = "cosine"  # LLaMA-Factory's examples (HF's own default is linear)
    warmup_ratio: float = 0.0  # of the total steps; warmup_steps wins when both are set (HF TrainingArguments)
    warmup_steps: int = 0
    logging_steps: int = 1
    seed: int = 42
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None  # keep only the last N checkpoints; None: all
    resume: bool = False
    overwrite: bool = False
    random_init: bool = False
    smoke_test: bool = False
    auto_retry: bool = False
    probe: bool = True  # one step on the heaviest micro-batch before training (runner/probe.py)
    launcher: str = "torchrun"
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port on one node, 29500 across nodes
    plan: dict | None = None  # the plan the settings came from (Plan.to_dict()), recorded with the run

    def __post_init__(self) -> None:
        for name, flag in (("cutoff_len", "--cutoff-len"), ("max_samples", "--max-samples"),
                           ("max_steps", "--max-steps"), ("save_total_limit", "--save-total-limit")):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise VlplanError(f"{flag} must be positive, got {value}")
        for name, flag in (("save_steps", "--save-steps"), ("logging_steps", "--logging-steps")):
            if getattr(self, name) <= 0:
                raise VlplanError(f"{flag} must be positive, got {getattr(self, name)}")
        # nan compares false with everything: test finiteness first (a nan learning rate trains non-finite weights)
        if not math.isfinite(self.epochs) or self.epochs <= 0:
            raise VlplanError(f"--epochs must be a positive number, got {self.epochs}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise VlplanError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if not (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise VlplanError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            raise VlplanError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise VlplanError(f"--lr-scheduler-type {self.lr_scheduler_type!r} is not one of "
                              f"{', '.join(LR_SCHEDULERS)}")
        if self.save_strategy not in SAVE_STRATEGIES:
            raise VlplanError(f"--save-strategy {self.save_strategy!r} is not one of {', '.join(SAVE_STRATEGIES)} "
                              "(vlplan run does not evaluate, so there is no best checkpoint)")
        if self.resume and self.overwrite:
            raise VlplanError("--resume continues the run in the output directory and --overwrite replaces it; "
                              "pass one of them")
        if self.launcher not in LAUNCHERS:
            raise VlplanError(f"--launcher {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.node_rank < 0:
            raise VlplanError(f"--node-rank must be 0 or more, got {self.node_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise VlplanError(f"--master-port must be a TCP port (1-65535), got {self.master_port}")

    def check(self, setup: TrainSetup) -> None:
        """What only the setup can tell: this node's rank among the setup's nodes."""
        if self.node_rank >= setup.num_nodes:
            raise VlplanError(f"--node-rank {self.node_rank} is not a node of --num-nodes {setup.num_nodes} "
                              f"(ranks 0 to {setup.num_nodes - 1})")

    def cutoff_for(self, setup: TrainSetup) -> int:
        return self.cutoff_len if self.cutoff_len is not None else setup.seq_len

    def learning_rate_for(self, setup: TrainSetup) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[setup.method]

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


def setup_from_settings(settings: dict, spec: ModelSpec, what: str = "settings") -> TrainSetup:
    """The TrainSetup of `TrainSetup.describe()`'s dict (a saved plan's "settings", a job), on the model `spec`."""
    if not isinstance(settings, dict):
        raise VlplanError(f"{what} must be a JSON object, got {type(settings).__name__}")
    if settings.get("model") not in (None, spec.name):
        raise VlplanError(f"{what} are for model {settings['model']!r} but --model is {spec.name!r}; pass the model "
                          "the plan was made for")
    known = {f.name for f in fields(TrainSetup)}
    unknown = sorted(set(settings) - known - {"model", "world_size"})
    if unknown:
        raise VlplanError(f"{what} have settings this vlplan does not know: {', '.join(unknown)}")
    values = {k: v for k, v in settings.items() if k in known and k != "model"}
    try:
        for key in ("vision", "projector", "language"):
            if key in values:
                values[key] = Train(values[key])
        if "lora" in values:
            lora = dict(values["lora"])
            lora["targets"] = tuple(lora.get("targets", ("all",)))
            values["lora"] = LoraSettings(**lora)
        if "oft" in values:
            values["oft"] = OftSettings(**values["oft"])
        if "images" in values:
            values["images"] = tuple(parse_size(s) if isinstance(s, str) else tuple(s) for s in values["images"])
        if "gpu" in values:
            values["gpu"] = _gpu(values["gpu"])
    except (TypeError, ValueError) as err:
        if isinstance(err, VlplanError):
            raise
        raise VlplanError(f"{what}: {err}") from None
    return TrainSetup(model=spec, **values)


def _gpu(name: str):
    if isinstance(name, str) and name.startswith("custom-") and name.endswith("g"):
        try:
            return custom_gpu(float(name[len("custom-"):-1]))
        except ValueError:
            pass
    return find_gpu(name)


def job_json(setup: TrainSetup, options: RunOptions) -> str:
    return json.dumps({"settings": setup.describe(), "options": asdict(options)}, separators=(",", ":"))


def job_from_json(text: str) -> tuple[TrainSetup, RunOptions]:
    """The job a launcher handed to this process."""
    from vlplan.planner.registry import resolve

    try:
        job = json.loads(text)
        options = RunOptions(**job["options"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise VlplanError(f"{JOB_ENV} does not hold a vlplan job ({err})") from None
    return setup_from_settings(job["settings"], resolve(options.model), JOB_ENV), options


def load_plan(path: str | Path) -> dict:
    """A plan saved with `vlplan plan --json` (Plan.to_dict())."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise VlplanError(f"cannot read --plan {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise VlplanError(f"--plan {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise VlplanError(f"--plan {path} is not a saved plan (no \"settings\" object); save one with "
                          "`vlplan plan ... --json > plan.json`")
    return data
