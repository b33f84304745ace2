import os

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
