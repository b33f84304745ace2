"""Importing LLaMA-Factory's data modules in tests: llamafactory.data imports mm_plugin, which imports torchaudio at
the top for audio inputs only. Without torchaudio installed, a stand-in module is in place for the import alone and
removed after (no audio path runs in these tests). llamafactory.hparams checks the transformers version on import;
the check is skipped (its own DISABLE_VERSION_CHECK) for the import, as the dataclasses it defines do not depend on
it."""

import importlib
import sys
import types

import pytest


def import_llamafactory(name: str):
    pytest.importorskip("llamafactory")
    import os

    previous = os.environ.get("DISABLE_VERSION_CHECK")
    os.environ["DISABLE_VERSION_CHECK"] = "1"
    try:
        return _import(name)
    finally:
        if previous is None:
            del os.environ["DISABLE_VERSION_CHECK"]
        else:
            os.environ["DISABLE_VERSION_CHECK"] = previous


def _import(name: str):
    if importlib.util.find_spec("torchaudio") is not None or "torchaudio" in sys.modules:
        return importlib.import_module(name)
    import peft  # noqa: F401  (imported first: transformers' availability checks run before the stand-in exists)
    from transformers.utils import is_torchaudio_available

    assert not is_torchaudio_available()  # cached: later checks keep answering False
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules["torchaudio"]
