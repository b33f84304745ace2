"""vlplan: plan, prove and launch vision-language model fine-tunes.

The public API, one function per stage, each taking the one `TrainSetup` (the CLI commands call these same
functions)::

    from vlplan import resolve_setup, estimate, plan, trace, profile, run, scan

    setup = resolve_setup(model="qwen2.5-vl-7b", method="lora").setup  # flags / YAML / DeepSpeed JSON / dataset
    estimate(setup).peak_bytes                 # planner: symbolic re-execution, pure Python
    plan(setup, global_batch_size=64)          # planner: the fastest settings that fit
    scan("data.json", setup.model)             # planner: tokens per sample of a LLaMA-Factory dataset, bad images
    trace(setup)                               # profiler: the real step on fake tensors (torch, transformers)
    profile(setup, ProfileOptions(steps=3))    # profiler: real steps on the GPU, per phase
    run(setup, RunOptions(model="DIR", dataset="data.json", output_dir="out"))  # runner: the fine-tune

The names are imported on first use (module `__getattr__`), so `import vlplan` stays fast and torch-free: only
`trace`, `profile` and `run` import torch, when they are first touched.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "resolve_setup": ("vlplan.planner.resolve", "resolve_setup"),
    "estimate": ("vlplan.planner.memory.estimate", "estimate"),
    "plan": ("vlplan.planner.plan", "plan"),
    "scan": ("vlplan.planner.dataset", "scan_dataset"),
    "trace": ("vlplan.profiler.trace", "trace"),
    "profile": ("vlplan.profiler.profile", "profile"),
    "run": ("vlplan.runner.launch", "run"),
    # the types the functions take and raise
    "TrainSetup": ("vlplan.planner.setup", "TrainSetup"),
    "RunOptions": ("vlplan.runner.job", "RunOptions"),  # what a run needs besides the setup (data, output, steps)
    "ProfileOptions": ("vlplan.profiler.profile", "ProfileOptions"),
    "VlplanError": ("vlplan.planner.errors", "VlplanError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'vlplan' has no attribute {name!r}")
    module, attribute = _API[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
