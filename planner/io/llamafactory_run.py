"""What a LLaMA-Factory training YAML asks of a run, beyond the TrainSetup: `vlplan run --from-llamafactory`.

`llamafactory.py` reads the keys that make the TrainSetup (method, precision, batch, cutoff_len, ...). This module reads
the keys only a launch uses: the model path, the dataset (`dataset` names looked up in `dataset_dir`'s
dataset_info.json, as LLaMA-Factory's data/parser.py `get_dataset_list` does), the output directory, the learning rate
and its schedule, steps or epochs, the save and logging keys, the seed and `max_samples`. It returns them as
`runner.job.RunOptions` field values, only for the keys the YAML sets: the defaults stay the library's (RunOptions),
and flags typed on the command line win over the YAML.

Every other training key is either honoured elsewhere (the TrainSetup's keys), makes no difference to what is trained
(`NO_EFFECT`, each with its reason), is at transformers' default (`HF_DEFAULTS`), or gets a one-line warning that
vlplan run does not apply it; a `stage` other than sft is refused (vlplan run trains supervised fine-tuning only).
Pure Python (no torch): key names and defaults are LLaMA-Factory v0.9.3's and transformers 5's TrainingArguments
(shared/reference/llamafactory.md section 1a).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import VlplanError
from .llamafactory import SETUP_KEYS  # the keys the TrainSetup is made of
from .llamafactory import COMMON_TRAINING_ARGUMENTS, NOT_MODELLED, llamafactory_keys, load_yaml

# YAML key -> RunOptions field
RUN_KEYS = {
    "model_name_or_path": "model", "dataset": "dataset", "dataset_dir": "dataset_dir", "media_dir": "media_dir",
    "output_dir": "output_dir", "learning_rate": "learning_rate", "max_steps": "max_steps",
    "num_train_epochs": "epochs", "lr_scheduler_type": "lr_scheduler_type", "warmup_ratio": "warmup_ratio",
    "warmup_steps": "warmup_steps", "save_steps": "save_steps", "save_strategy": "save_strategy",
    "save_total_limit": "save_total_limit", "logging_steps": "logging_steps", "seed": "seed",
    "max_samples": "max_samples",
}
# LLaMA-Factory DataArguments.dataset_dir's default (hparams/data_args.py), relative to where it is launched
DEFAULT_DATASET_DIR = "data"
DATASET_INFO_NAME = "dataset_info.json"  # LLaMA-Factory extras/constants.py DATA_CONFIG

# Keys that change nothing in what is trained (speed, logging, caching, hub uploads), each with why
NO_EFFECT = {
    "do_train": "vlplan run trains",
    "trust_remote_code": "vlplan run loads the installed transformers model class; no remote code runs",
    "overwrite_cache": "LLaMA-Factory's preprocessing cache; vlplan run encodes the data itself",
    "preprocessing_num_workers": "preprocessing speed only",
    "preprocessing_batch_size": "preprocessing speed only",
    "dataloader_num_workers": "loading speed only (vlplan run loads in the training process)",
    "dataloader_pin_memory": "loading speed only",
    "dataloader_persistent_workers": "loading speed only",
    "plot_loss": "vlplan_run.json holds every logged loss",
    "report_to": "logging integrations only",
    "logging_dir": "logging integrations only",
    "run_name": "logging integrations only",
    "disable_tqdm": "progress display only",
    "ddp_timeout": "a distributed timeout, not the training",
    "save_safetensors": "vlplan run saves safetensors",
    "include_num_input_tokens_seen": "a logged count only",
    "local_rank": "set by the launcher",
}
# transformers TrainingArguments (5.x) and LLaMA-Factory defaults of keys vlplan run leaves at that default: a YAML
# with the same value asks for nothing else; any other value is warned about
HF_DEFAULTS = {
    "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "data_seed": None,
    "logging_strategy": "steps", "logging_first_step": False, "save_only_model": False, "do_eval": False,
    "do_predict": False, "eval_strategy": "no", "evaluation_strategy": "no", "val_size": 0.0,
    "resume_from_checkpoint": None, "overwrite_output_dir": False, "push_to_hub": False, "streaming": False,
    "train_on_prompt": False, "mask_history": False, "group_by_length": False, "label_smoothing_factor": 0.0,
    "neftune_noise_alpha": None, "torch_empty_cache_steps": None, "auto_find_batch_size": False,
    "load_best_model_at_end": False, "lr_scheduler_kwargs": None, "optim_args": None, "tf32": None,
    "gradient_checkpointing_kwargs": None, "max_grad_norm": 1.0, "remove_unused_columns": False,
}
# Every key LLaMA-Factory or the HF Trainer takes (others are reported as unknown by llamafactory.py)
KNOWN_KEYS = llamafactory_keys("latest") | COMMON_TRAINING_ARGUMENTS

# What a warning adds for a few keys (why it matters, or the flag that does it)
_HOW = {
    "overwrite_output_dir": "pass --overwrite to replace an earlier run in output_dir, or --resume to continue it",
    "resume_from_checkpoint": "pass --resume to continue the output directory's last checkpoint",
    "template": "vlplan run renders each sample with the model directory's chat template",
    "train_on_prompt": "vlplan run trains on the assistant turns only",
    "mask_history": "vlplan run trains on every assistant turn",
    "do_eval": "vlplan run does not evaluate",
    "val_size": "vlplan run does not evaluate",
    "eval_strategy": "vlplan run does not evaluate",
}


def llamafactory_run_options(source: str | Path | dict) -> tuple[dict, list[str]]:
    """The RunOptions fields a LLaMA-Factory training YAML (path or loaded dict) sets, and a warning for each of
    its training keys that vlplan run does not apply. Paths are as LLaMA-Factory reads them (from the directory it
    is launched in); a `dataset_dir` missing there is looked for beside the YAML."""
    if isinstance(source, dict):
        config, name, yaml_dir = source, "the LLaMA-Factory config", None
    else:
        config, name, yaml_dir = load_yaml(source), str(source), Path(source).parent
    stage = config.get("stage", "sft")
    if stage != "sft":
        raise VlplanError(f"{name}: stage {stage}: vlplan run trains supervised fine-tuning (stage sft) only")
    options: dict = {}
    read = _Reader(config, name)
    for key in ("model_name_or_path", "output_dir"):
        if config.get(key) is not None:
            options[RUN_KEYS[key]] = read.text(key)
    options.update(dataset_files(config, name, yaml_dir))
    if config.get("learning_rate") is not None:
        options["learning_rate"] = read.number(key="learning_rate", positive=True)
    if config.get("max_steps") is not None and read.integer("max_steps", minimum=None) > 0:
        options["max_steps"] = read.integer("max_steps")  # HF: -1 (the default) or 0 = train num_train_epochs
    if config.get("num_train_epochs") is not None:
        options["epochs"] = read.number("num_train_epochs", positive=True)
    if config.get("lr_scheduler_type") is not None:
        options["lr_scheduler_type"] = read.text("lr_scheduler_type")
    if config.get("warmup_ratio") is not None:
        options["warmup_ratio"] = read.number("warmup_ratio")
    if config.get("warmup_steps") is not None:
        steps = read.number("warmup_steps")
        if 0 < steps < 1:  # transformers 5: a float in [0, 1) is a ratio of the total steps
            options["warmup_ratio"] = steps
        else:
            options["warmup_steps"] = read.integer("warmup_steps", minimum=0)
    for key in ("save_steps", "logging_steps", "save_total_limit", "max_samples"):
        if config.get(key) is not None:
            options[RUN_KEYS[key]] = read.integer(key, ratio_hint=key in ("save_steps", "logging_steps"))
    if config.get("save_strategy") is not None:
        options["save_strategy"] = read.text("save_strategy")
    if config.get("seed") is not None:
        options["seed"] = read.integer("seed", minimum=0)
    return options, _not_applied(config, name)


def llamafactory_dataset(path: str | Path) -> dict:
    """Only the dataset keys of a training YAML (`dataset_files`): what `vlplan scan --from-llamafactory` needs."""
    return dataset_files(load_yaml(path), str(path), Path(path).parent)


def dataset_files(config: dict, name: str, yaml_dir: Path | None) -> dict:
    """`dataset`, `dataset_dir`, `dataset_info` and `media_dir` as RunOptions fields: a dataset name is an entry of
    dataset_dir/dataset_info.json (LLaMA-Factory's layout, dataset_dir defaulting to `data`)."""
    out: dict = {}
    value = config.get("dataset")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    names = [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else None
    if value is not None and not names:
        raise VlplanError(f"{name}: dataset must name a dataset of dataset_info.json, got {value!r}")
    if names:
        out["dataset"] = ",".join(names)  # several: refused by `one_dataset` where the YAML's dataset is used
    directory = config.get("dataset_dir")
    if directory is not None and not isinstance(directory, str):
        raise VlplanError(f"{name}: dataset_dir must be a folder path, got {directory!r}")
    if directory == "ONLINE":
        raise VlplanError(f"{name}: dataset_dir ONLINE loads datasets from a hub; vlplan run reads local files: "
                          "download the data and point dataset_dir at its folder")
    if directory is not None or names:
        folder = find_dataset_dir(directory or DEFAULT_DATASET_DIR, yaml_dir, with_info=bool(names))
        if folder is None:
            if directory is not None:
                raise VlplanError(f"{name}: dataset_dir {directory} does not exist (looked in the current directory"
                                  f"{' and beside the YAML' if yaml_dir is not None else ''})")
        else:
            out["dataset_dir"] = str(folder)
            if (folder / DATASET_INFO_NAME).is_file():
                out["dataset_info"] = str(folder / DATASET_INFO_NAME)
    media = config.get("media_dir")
    if media is not None:
        if not isinstance(media, str):
            raise VlplanError(f"{name}: media_dir must be a folder path, got {media!r}")
        out["media_dir"] = media
    return out


def one_dataset(value: str, name: str) -> str:
    """The YAML's dataset where it is the one a command reads: vlplan reads one dataset at a time."""
    names = value.split(",")
    if len(names) > 1:
        raise VlplanError(f"{name}: dataset names {len(names)} datasets ({', '.join(names)}); vlplan reads one: "
                          "merge them into one file, or pass the dataset (--dataset, or scan's DATA) to use")
    return value


def find_dataset_dir(value: str, yaml_dir: Path | None, *, with_info: bool = False) -> Path | None:
    """The folder `dataset_dir` names: as given (LLaMA-Factory runs from its repository root), else beside the YAML
    and up to three folders above it (a YAML in examples/train_lora/ naming `data`). `with_info`: the first of
    these holding a dataset_info.json (a dataset name is looked up there), else the first that exists."""
    path = Path(value).expanduser()
    candidates = [path]
    if not path.is_absolute() and yaml_dir is not None:
        candidates += [yaml_dir / path] + [parent / path for parent in list(yaml_dir.parents)[:3]]
    folders = [c for c in candidates if c.is_dir()]
    if with_info:
        return next((c for c in folders if (c / DATASET_INFO_NAME).is_file()), folders[0] if folders else None)
    return folders[0] if folders else None


def _not_applied(config: dict, name: str) -> list[str]:
    """A warning for each key that vlplan run neither applies nor can ignore without changing what is trained."""
    warnings = []
    for key, value in config.items():
        if key in RUN_KEYS or key in NO_EFFECT or key == "stage":
            continue
        if key in SETUP_KEYS:
            continue  # the TrainSetup's; llamafactory.py warns about what it does not model
        if key in NOT_MODELLED:
            if value not in (None, False, 0, ""):
                warnings.append(f"{name}: {key} {_shown(value)} is not applied by vlplan run")
            continue
        if key in HF_DEFAULTS and _same(value, HF_DEFAULTS[key]):
            continue
        if key not in KNOWN_KEYS:
            continue  # llamafactory.py reports it as an unknown key
        how = _HOW.get(key) or (f"vlplan run keeps the default {HF_DEFAULTS[key]!r}" if key in HF_DEFAULTS
                                else "vlplan run trains without it")
        if key.startswith(("eval_", "per_device_eval")):
            how = "vlplan run does not evaluate"
        warnings.append(f"{name}: {key} {_shown(value)} is not applied by vlplan run ({how})")
    return warnings


def _shown(value) -> str:
    """A YAML value as the YAML writes it (true/false/null, not Python's True/False/None)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _same(value, default) -> bool:
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(value, default)
    if isinstance(default, str) and isinstance(value, str):
        return value.lower() == default
    return value == default


class _Reader:
    """Typed access to one YAML's run keys with one-line errors. PyYAML reads `5e-3` (no dot) as a string, and
    LLaMA-Factory's HfArgumentParser converts it: numbers written as strings are accepted."""

    def __init__(self, config: dict, name: str):
        self.config, self.name = config, name

    def text(self, key: str) -> str:
        value = self.config[key]
        if not isinstance(value, str) or not value.strip():
            raise VlplanError(f"{self.name}: {key} must be a string, got {value!r}")
        return value

    def number(self, key: str, *, positive: bool = False) -> float:
        value = self.config[key]
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (positive and number <= 0) or number < 0:
            raise VlplanError(f"{self.name}: {key} must be a {'positive' if positive else 'non-negative'} number, "
                              f"got {value!r}")
        return number

    def integer(self, key: str, *, minimum: int | None = 1, ratio_hint: bool = False) -> int:
        value = self.config[key]
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if ratio_hint and isinstance(number, float) and 0 < number < 1:
            raise VlplanError(f"{self.name}: {key} {value} is a ratio of the total steps, which vlplan run does not "
                              "take; give a number of steps")
        if not isinstance(number, int) or isinstance(number, bool) or (minimum is not None and number < minimum):
            bound = "" if minimum is None else f" of at least {minimum}"
            raise VlplanError(f"{self.name}: {key} must be a whole number{bound}, got {value!r}")
        return number
