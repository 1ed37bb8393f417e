"""Databricks as it is today (training/driver/storage.py): Unity Catalog volumes by default, DBFS only when named,
table copies only into a volume, and a run with nowhere to write refused before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, subprocess_env

import training.driver.storage as storage
from training.driver.notebook import run_paths
from training.driver.storage import StorageError, databricks_roots, notebook_volume, table_copy_dir


@pytest.fixture
def volumes(tmp_path, monkeypatch):
    """A stand-in /Volumes, and a home folder of the test's own (no /local_disk0 on this machine)."""
    root = tmp_path / "Volumes"
    monkeypatch.setattr(storage, "VOLUMES_ROOT", str(root))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert not os.path.exists("/local_disk0") and not os.path.exists("/dbfs")
    return root


class CatalogSpark:
    def __init__(self, root: Path, may_create: bool = True):
        self.root, self.may_create, self.sent = root, may_create, []

    def sql(self, query):
        self.sent.append(query)
        if "current_catalog()" in query:
            return type("Result", (), {"first": lambda self: ("main", "default")})()
        if not self.may_create:
            raise PermissionError("User does not have CREATE VOLUME on Schema 'main.default'")
        self.root.joinpath(*(part.strip("`") for part in query.split()[-1].split("."))).mkdir(parents=True)


def test_the_default_volume_is_created_and_holds_the_copy_and_multi_node_runs(volumes, tmp_path):
    spark = CatalogSpark(volumes)
    volume = notebook_volume(spark, "", databricks=True)
    assert volume == f"{volumes}/main/default/dolly" and Path(volume).is_dir()
    assert spark.sent[-1] == "CREATE VOLUME IF NOT EXISTS `main`.`default`.`dolly`"
    one = run_paths("", "", "", databricks=True, timestamp="T", volume=volume)
    assert one.local_output_dir == f"{tmp_path}/home/dolly_training/dolly__T"  # the driver's own disk: scratch
    assert one.dbfs_output_dir == f"{volume}/dolly_training/dolly__T"  # the finished model's copy: the volume
    many = run_paths("", "", "", databricks=True, timestamp="T", num_nodes=2, volume=volume)
    assert many.local_output_dir == f"{volume}/dolly_training/runs/dolly__T" and many.dbfs_output_dir is None
    assert notebook_volume(spark, "", databricks=True) == volume and len(spark.sent) == 3  # there: not created again


def test_with_no_volume_and_no_dbfs_the_run_is_refused_saying_what_to_set(volumes):
    spark = CatalogSpark(volumes, may_create=False)
    assert notebook_volume(spark, "", databricks=True) == ""  # the default could not be created
    with pytest.raises(StorageError, match=r"ends with the cluster: set the volume widget to a Unity Catalog volume"):
        run_paths("", "", "", databricks=True, timestamp="T", volume="")
    with pytest.raises(StorageError, match="num_nodes 2 needs storage every node sees: set the volume widget"):
        run_paths("", "", "", databricks=True, timestamp="T", num_nodes=2)
    with pytest.raises(StorageError, match=r"the volume widget names .*mine/x/y, which does not exist"):
        notebook_volume(spark, str(volumes / "mine" / "x" / "y"), databricks=True)
    # DBFS only when named, and refused where the workspace has none.
    with pytest.raises(StorageError, match="dbfs_output_root names /dbfs/mine, but this workspace has no DBFS"):
        databricks_roots(local_training_root="", dbfs_output_root="/dbfs/mine", volume="", num_nodes=1)


def test_a_tables_rows_are_copied_only_into_a_volume(volumes):
    with pytest.raises(StorageError, match="copied for training only into a volume: set the volume widget"):
        table_copy_dir("", databricks=True, fallback="/local_disk0/dolly_training/prepared_data")
    volume = str(volumes / "main" / "default" / "dolly")
    assert table_copy_dir(volume, databricks=True, fallback="x") == f"{volume}/dolly_training/prepared_data"
    assert table_copy_dir("", databricks=False, fallback="beside/the/runs") == "beside/the/runs"


@pytest.mark.launch
def test_the_notebook_on_a_workspace_without_dbfs_trains_into_the_default_volume(tiny_model_dir, sample_path, tmp_path):
    """train_dolly.py's cells as Databricks runs them (test/databricks_notebook.py: dbutils, a Unity Catalog Spark
    session, no /dbfs) with the Databricks defaults but the model, data and a CPU family: the default volume is
    created, the finished model is copied there complete, the run record and the model card name it, the notebook
    loads the copy, and nothing is written to DBFS."""
    from training.folder_commit import is_complete

    volumes = tmp_path / "Volumes"
    widgets = {
        "input_model": str(tiny_model_dir),
        "training_dataset": str(sample_path),
        "gpu_family": "cpu",
        "num_gpus": "2",
        "experiment_id": "uc",
    }
    env = subprocess_env(
        DOLLY_VOLUMES_ROOT=str(volumes),
        DOLLY_TEST_WIDGETS=json.dumps(widgets),
        HOME=str(tmp_path / "home"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",  # the workspace's tracking server, stood in
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
    )
    run = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "test" / "databricks_notebook.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    volume = volumes / "main" / "default" / "dolly"
    copies = list((volume / "dolly_training").glob("dolly__uc__*"))
    assert len(copies) == 1 and is_complete(copies[0]) and (copies[0] / "model.safetensors").is_file()
    local = tmp_path / "home" / "dolly_training" / copies[0].name
    record = json.loads((local / "run_config.json").read_text())
    assert record["settings"]["dbfs_output_dir"] == str(copies[0]) and record["settings"]["launch_id"]
    assert f"copied to `{copies[0]}`" in (copies[0] / "README.md").read_text()
    assert f"Loading the trained model from its copy {copies[0]}" in run.stdout
    assert "Instruction: Explain to me the difference between nuclear fission and fusion." in run.stdout
    assert not os.path.exists("/dbfs") and not list(tmp_path.rglob(".building-*"))
