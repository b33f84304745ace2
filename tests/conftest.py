import os

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's output is tested as in a pipe unless a test sets COLUMNS itself: pytest-xdist's workers inherit COLUMNS=80,
# which rich's console reads once, when vlplan.cli.render is imported
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
# Under pytest-xdist (the default run: pyproject's addopts), torch's threads in each worker and in the processes the
# tests start share the cores among the workers instead of each taking them all
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# Property tests draw the same examples on every run (the suite is deterministic: a failure reproduces, a pass does
# not depend on the seed) and keep no example database in the checkout. Tests' own @settings add to this profile.
settings.register_profile("vlplan", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vlplan"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, on a machine without a CUDA GPU (torch is imported only when
    such a test was collected)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_result_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own empty persistent result cache (planner/cache.py), never the user's nor another test's."""
    monkeypatch.setenv("VLPLAN_CACHE_DIR", str(tmp_path_factory.mktemp("vlplan-cache")))
    monkeypatch.delenv("VLPLAN_NO_CACHE", raising=False)
