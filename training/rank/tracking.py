"""MLflow tracking: one MLflow run per training run, written by global rank 0 only.

Where runs go is MLflow's own business: ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` (or
``MLFLOW_EXPERIMENT_ID``) as MLflow reads them, else MLflow's default store. Rank 0 opens the run before training;
the Trainer's own ``MLflowCallback`` (``report_to="mlflow"``) then logs the training arguments and every logged
metric (loss, eval loss, learning rate, tokens per second) into it. Afterwards the run gets the settings, the
``run_config.json``, the model card, the loss plot and the model as an MLflow model that serves the pipeline
(:mod:`training.mlflow_model`). A ``--resume`` opens a new run tagged with the one it continues; ``--no-mlflow``
turns all of it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..settings import SettingsError, TrainSettings, replayed_names
from .stopping import RunStopped

logger = logging.getLogger(__name__)

ARTIFACT_FOLDER = "training"


def local_mlflow_store(folder: str | Path, experiment: str | None = None) -> str:
    """A sqlite MLflow store in ``folder`` whose runs keep their artifacts there too (not in the current folder,
    MLflow's default); creates ``experiment`` in it when named. Returns the tracking URI."""
    from mlflow.tracking import MlflowClient

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    here = Path.cwd()
    # Two runs starting at once on one training root would both create the store's tables (and the experiment), and
    # the second would fail: one at a time.
    with open(folder / ".mlflow.db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.chdir(folder)  # the store's default experiment keeps its artifacts beside the database
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # creates the tables now, inside the lock
            if experiment and client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment, artifact_location=(folder / "mlartifacts" / experiment).as_uri())
        finally:
            os.chdir(here)
    return uri


def settings_params(settings: TrainSettings) -> dict[str, Any]:
    """The settings that define the training, as MLflow parameters (``setting.lr``, ...). The per-invocation ones
    (``--resume``, the output copy, the rank) are not parameters: a resumed run logs the same parameters again."""
    replayed = replayed_names()
    return {f"setting.{name}": value for name, value in settings.to_json_dict().items() if name in replayed}


RESUMED_FROM_TAG = "dolly.resumed_from_run_id"


@contextlib.contextmanager
def mlflow_run(settings: TrainSettings, *, main_process: bool, resumed_from: str | None = None) -> Iterator[Any]:
    """The MLflow run of this training on rank 0 (None elsewhere, or with ``--no-mlflow``).

    A resumed training gets a run of its own, tagged with the run it continues: MLflow parameters cannot change,
    and a resumed run may change some (a later ``--max-steps``; the Trainer's logging folder is new each time).
    Ended as FINISHED when the block completes, FAILED when it raises.
    """
    if not (settings.mlflow and main_process):
        yield None
        return
    import mlflow

    tags = {RESUMED_FROM_TAG: resumed_from} if resumed_from else None
    run = mlflow.start_run(run_name=Path(settings.local_output_dir).name, tags=tags)
    logger.info(
        "MLflow run %s in experiment %s (%s)", run.info.run_id, run.info.experiment_id, mlflow.get_tracking_uri()
    )
    try:
        mlflow.log_params(settings_params(settings))
        yield run
    except RunStopped:
        end_run(mlflow, "KILLED")  # MLflow's status for a run stopped before its end
        raise
    except BaseException:
        end_run(mlflow, "FAILED")
        raise
    end_run(mlflow, "FINISHED")


def end_run(mlflow: Any, status: str) -> None:
    """Close the run; a tracking store that cannot be written then (a full disk) is reported, and neither hides
    the training's own error nor fails a training that finished."""
    try:
        mlflow.end_run(status)
    except Exception:
        logger.warning("Could not mark the MLflow run %s", status, exc_info=True)


def log_run_files(run: Any, output_dir: Path, names: list[str]) -> None:
    """Attach files of the finished output (the run record, the model card, the loss plot) to the run."""
    if run is None:
        return
    import mlflow

    for name in names:
        if (output_dir / name).is_file():
            mlflow.log_artifact(str(output_dir / name), artifact_path=ARTIFACT_FOLDER, run_id=run.info.run_id)


REGISTERED_TAG = "dolly.registered_model"
UNITY_CATALOG_REGISTRY = "databricks-uc"


def check_registry(settings: TrainSettings) -> None:
    """Refuse, before anything starts, a ``--register-model`` name the registry the run would use cannot take:
    Unity Catalog (on Databricks, MLflow's default registry) needs catalog.schema.model."""
    if not (settings.register_model and settings.mlflow):
        return
    import mlflow

    registry = mlflow.get_registry_uri() or ""
    if registry.startswith(UNITY_CATALOG_REGISTRY) and settings.register_model.count(".") != 2:
        raise SettingsError(
            f"register_model (--register-model): the model registry is Unity Catalog ({registry}), which needs a "
            f"three-part name, catalog.schema.model; got {settings.register_model!r}"
        )


def note_logged_model(run: Any, output_dir: Path, logged: Any, registered_name: str | None) -> None:
    """Record the run's MLflow model, and the version it registered, in the output folder (the model card names
    them) and, when registered, as the run's tag ``dolly.registered_model`` (``NAME/VERSION``)."""
    import mlflow

    from ..folder_commit import write_atomically
    from ..saved_model.model_card import MLFLOW_MODEL_RECORD, write_model_card

    record: dict[str, Any] = {"model_uri": logged.model_uri, "run_id": run.info.run_id}
    version = getattr(logged, "registered_model_version", None)
    if registered_name and version is not None:
        record.update(registered_model=registered_name, version=int(version))
        mlflow.set_tag(REGISTERED_TAG, f"{registered_name}/{version}")
        logger.info("Registered the model as %s version %s", registered_name, version)
    write_atomically(output_dir / MLFLOW_MODEL_RECORD, json.dumps(record, indent=2) + "\n")
    write_model_card(output_dir)


def log_checkpoints(run: Any, output_dir: Path) -> None:
    """Attach the output's kept checkpoints to the run, each under ``checkpoints/NAME`` (``--mlflow-log-checkpoints``)."""
    if run is None:
        return
    import mlflow

    from .checkpoints import list_checkpoints

    for checkpoint in list_checkpoints(output_dir):
        logger.info("Logging %s to the MLflow run", checkpoint.name)
        mlflow.log_artifacts(str(checkpoint), artifact_path=f"checkpoints/{checkpoint.name}", run_id=run.info.run_id)
