"""Shared fixtures: tiny models built from config (no hub), the real data root, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
SUBSET_DATA = HERE / "data"  # small real subsets shipped with the tests (see tests/data/README.md)


def real_data_root() -> Path:
    """Real benchmark files: $BAYESLORA_TEST_DATA, else ../shared/data next to the checkout, else tests/data."""
    for candidate in (os.environ.get("BAYESLORA_TEST_DATA"), HERE.parents[1] / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return SUBSET_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The root of the real benchmark files used by the real-data tests."""
    return real_data_root()


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from bayeslora.models import load_tokenizer, locate

    return load_tokenizer(locate("minilm"), "seq_cls")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
