import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
