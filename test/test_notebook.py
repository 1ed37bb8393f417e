"""train_dolly.py: a Databricks notebook that also runs as a plain script, and the command lines it builds."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NOTEBOOK, PROJECT_ROOT, notebook_cells, subprocess_env

from training.driver.launch import launcher_command
from training.driver.notebook import (
    EXAMPLE_INSTRUCTIONS,
    NotebookWidgets,
    RunPaths,
    driver_generation_problem,
    notebook_plan,
    run_paths,
)
from training.settings import SettingsError


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


PATHS = RunPaths("/local/dolly__t", "/dbfs/dolly__t", "/local/dolly__t/runs")


@pytest.mark.parametrize(
    "family, config, batch, bf16_false",
    [
        ("v100", "v100_config.json", 3, True),
        ("a10", "a10_config.json", 4, False),
        ("a100", "a100_config.json", 6, False),
        ("h100", "a100_config.json", 6, False),
        ("cpu", "cpu_config.json", 2, False),
    ],
)
def test_deepspeed_command_per_gpu_family(family, config, batch, bf16_false):
    plan = notebook_plan(input_model="EleutherAI/pythia-2.8b", gpu_family=family, paths=PATHS, num_gpus="8")
    command = launcher_command(plan)
    assert Path(command[0]).name == "deepspeed" and command[1] == "--num_gpus=8"
    assert command[command.index("--module") + 1] == "training.trainer"
    assert plan.settings.deepspeed == option(command, "--deepspeed")  # the flags are the plan's settings
    assert Path(option(command, "--deepspeed")) == PROJECT_ROOT / "config" / config
    assert Path(option(command, "--deepspeed")).exists()
    assert option(command, "--per-device-train-batch-size") == str(batch)
    assert option(command, "--per-device-eval-batch-size") == str(batch)
    assert ("--bf16" in command) == bf16_false
    if bf16_false:
        assert option(command, "--bf16") == "false"
    assert option(command, "--input-model") == "EleutherAI/pythia-2.8b"
    assert option(command, "--local-output-dir") == "/local/dolly__t"
    assert option(command, "--dbfs-output-dir") == "/dbfs/dolly__t"


def test_dollys_recipe_on_gpus():
    plan = notebook_plan(input_model="m", gpu_family="a100", paths=PATHS)
    command = launcher_command(plan)
    assert not any(part.startswith("--num_gpus") for part in command)  # all GPUs of the node
    settings = plan.settings
    assert (settings.epochs, settings.lr, settings.warmup_steps) == (2, 5e-6, 50)
    assert (settings.save_steps, settings.eval_steps, settings.test_size) == (200, 50, 200)
    # The trainer reads the same settings back from the command line (values at their defaults need no flag).
    from training.settings import TrainSettings, given_settings
    from training.trainer import main

    flags = command[command.index("training.trainer") + 1 :]
    assert TrainSettings(**given_settings(main.make_context("trainer", flags))) == settings


@pytest.mark.parametrize("family", ["a10", "v100"])
def test_lora_and_qlora_switches(family):
    lora = launcher_command(
        notebook_plan(input_model="EleutherAI/pythia-12b", gpu_family=family, paths=PATHS, finetuning="lora")
    )
    assert option(lora, "--lora-r") == "16" and "--deepspeed" in lora and "--load-in-4bit" not in lora
    assert lora.count("--lr") == 1 and float(option(lora, "--lr")) == 1e-4  # the method's rate, written once
    qlora = launcher_command(
        notebook_plan(input_model="EleutherAI/pythia-12b", gpu_family=family, paths=PATHS, finetuning="qlora")
    )
    assert "--load-in-4bit" in qlora and option(qlora, "--lora-r") == "16"
    assert "--deepspeed" not in qlora  # ZeRO-3 cannot partition a 4-bit base
    with pytest.raises(ValueError, match="unknown finetuning"):
        notebook_plan(input_model="m", gpu_family=family, paths=PATHS, finetuning="half")


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="unknown gpu_family 'tpu'"):
        notebook_plan(input_model="m", gpu_family="tpu", paths=PATHS)


def test_run_paths_are_named_like_dollys(tmp_path):
    volume = tmp_path / "Volumes" / "main" / "default" / "dolly"
    paths = run_paths("my exp", str(tmp_path), "", databricks=True, timestamp="2026-01-01T00:00:00", volume=str(volume))
    assert paths.local_output_dir == f"{tmp_path}/dolly__my_exp__2026-01-01T00:00:00"
    assert paths.dbfs_output_dir == f"{volume}/dolly_training/dolly__my_exp__2026-01-01T00:00:00"
    assert paths.tensorboard_display_dir == paths.local_output_dir + "/runs"
    local = run_paths("", "", "", databricks=False, timestamp="T")
    assert local.dbfs_output_dir is None and local.local_output_dir.endswith("dolly_runs/dolly__T")
    # Databricks without a volume or DBFS: refused (see test_storage.py for the rest of where things go).
    with pytest.raises(ValueError, match="set the volume widget"):
        run_paths("", "", "", databricks=True, timestamp="T", num_nodes=2)


def test_local_widgets_come_from_flags_then_environment_then_defaults():
    widgets = NotebookWidgets(argv=["--gpu_family", "a10"], environ={"DOLLY_GPU_FAMILY": "v100", "DOLLY_NUM_GPUS": "4"})
    assert widgets.get("gpu_family") == "a10"
    assert widgets.get("num_gpus") == "4"
    assert widgets.get("input_model") == "embedded"
    assert widgets.get("training_dataset").endswith("data/dolly_sample.jsonl")
    with pytest.raises(SystemExit):
        NotebookWidgets(argv=["--gpu_family", "tpu"], environ={})


class FakeDbutils:
    """Records widget creation the way dbutils.widgets is called on Databricks."""

    def __init__(self):
        self.created = {}
        self.widgets = self

    def text(self, name, default, label):
        self.created[name] = ("text", default, None)

    def combobox(self, name, default, choices, label):
        self.created[name] = ("combobox", default, choices)

    def dropdown(self, name, default, choices, label):
        self.created[name] = ("dropdown", default, choices)

    def get(self, name):
        return self.created[name][1]


def test_databricks_widgets_are_dollys():
    dbutils = FakeDbutils()
    widgets = NotebookWidgets(dbutils)
    assert set(dbutils.created) >= {
        "input_model",
        "num_gpus",
        "local_training_root",
        "dbfs_output_root",
        "experiment_id",
        "gpu_family",
    }
    kind, default, choices = dbutils.created["input_model"]
    assert (kind, default) == ("combobox", "EleutherAI/pythia-6.9b") and "databricks/dolly-v2-12b" in choices
    assert dbutils.created["gpu_family"][0:2] == ("dropdown", "a100")
    assert set(dbutils.created["gpu_family"][2]) == {"v100", "a10", "a100", "h100", "cpu"}
    assert widgets.get("training_dataset") == "databricks/databricks-dolly-15k"


def test_notebook_cells_parse_as_databricks_source():
    cells = notebook_cells()
    assert len(cells) >= 8
    magic_cells = [c for c in cells if c.startswith("# MAGIC")]
    assert all(all(line.startswith("# MAGIC") for line in c.splitlines()) for c in magic_cells)
    assert any("%pip install -r requirements_no_torch.txt" in c for c in magic_cells)
    assert any("%tensorboard --logdir '{tensorboard_display_dir}'" in c for c in magic_cells)
    assert magic_cells[0].startswith("# MAGIC %md")
    widget_cell = next(c for c in cells if "NotebookWidgets(" in c)
    assert 'globals().get("dbutils")' in widget_cell
    launch_cell = next(c for c in cells if "launch_training(" in c)
    assert "launch_training(plan, spark=spark)" in launch_cell
    for cell in cells:
        if not cell.startswith("# MAGIC"):
            compile(cell, "cell", "exec")  # every code cell is plain Python


class FakeLibraryDbutils:
    """dbutils.library as the install cells call it on Databricks."""

    def __init__(self):
        self.library = self
        self.restarts = 0

    def restartPython(self):  # noqa: N802 (dbutils' name)
        self.restarts += 1


def test_databricks_install_step_keeps_the_installed_torch(tmp_path):
    """The notebook's install cells, run as on Databricks: pip's real resolver (offline, dry run) in this
    environment, whose torch stands for the runtime's, must plan to install no torch; then Python restarts."""
    import json

    import torch

    cells = notebook_cells()
    install_at = next(i for i, c in enumerate(cells) if c.startswith("# MAGIC %pip"))
    requirements = cells[install_at].split()[-1]
    assert "torch" not in [
        line.split(">")[0].split("=")[0].strip() for line in (PROJECT_ROOT / requirements).read_text().splitlines()
    ]
    report = tmp_path / "report.json"
    planned = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(PROJECT_ROOT / requirements),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert planned.returncode == 0, planned.stderr[-3000:]
    to_install = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
    assert "torch" not in to_install and torch.__version__.startswith("2.")
    dbutils = FakeLibraryDbutils()
    exec(cells[install_at + 1], {"dbutils": dbutils})
    assert dbutils.restarts == 1
    # Everywhere else the full requirements, torch included, are what the environment is made from.
    full = (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
    assert f"-r {requirements}" in full and any(line.startswith("torch>=") for line in full)


def test_the_five_example_instructions_are_dollys():
    assert len(EXAMPLE_INSTRUCTIONS) == 5
    joined = " ".join(EXAMPLE_INSTRUCTIONS)
    for topic in (
        "Edgar Allan Poe",
        "tweet announcing Dolly",
        "Nikon D-750",
        "fission and fusion",
        "science fiction books",
    ):
        assert topic in joined


# Lines the default run printed before, which misled or which no user could act on (see training/logs.py).
NOT_IN_THE_LOG = (
    "Resizing token embeddings from 0 to",  # ZeRO-3's partitioned view of the embedding
    "initialized from a multivariate normal distribution",  # transformers' note, before our own initialisation
    "Failed to load CPU gemm_4bit_forward from kernels-community",  # bitsandbytes, at every import
    "Attempting to get learning rate from scheduler before it has started",  # DeepSpeed, at the first log
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # DeepSpeed's use of torch's old name
    "'pin_memory' argument is set as true but no accelerator is found",
    "The following generation flags are not valid and may be ignored",  # Dolly's sampling flags on greedy answers
    "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config",  # on every rank, at train start
)
# Lines rank 0 logs once per run: with two ranks, each must still appear exactly once.
RANK_ZERO_LINES = (
    "Training in fp32",
    "Resizing token embeddings from 500 to 503",
    "Initialized the rows of '### End', '### Instruction:', '### Response:\\n' from existing tokens",
    "Batching with DataCollatorForPackedCompletionOnlyLM",
    "] Done.",
)


@pytest.fixture(scope="module")
def model_needing_resize(sample_path, tmp_path_factory):
    """The tiny GPT-NeoX with exactly its tokenizer's rows, so that Dolly's tokens resize the embeddings (under ZeRO-3
    in the notebook's run)."""
    from bench.synthetic import build_tiny_sample_model

    return build_tiny_sample_model(tmp_path_factory.mktemp("tiny-resized"), sample_path, vocab_multiple=1)


@pytest.mark.launch
def test_notebook_runs_end_to_end_as_a_script(model_needing_resize, sample_path, tmp_path):
    env = subprocess_env()
    env["DOLLY_NO_ENV_SETUP"] = "1"
    env["DOLLY_INPUT_MODEL"] = str(model_needing_resize)
    # Tiny model: keep the five generations short.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.pop("MLFLOW_TRACKING_URI", None)  # as a newcomer runs it: the notebook picks the MLflow store
    result = subprocess.run(
        [
            sys.executable,
            str(NOTEBOOK),
            "--local_training_root",
            str(tmp_path),
            "--experiment_id",
            "ci run",
            "--training_dataset",
            str(sample_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    outputs = list(tmp_path.glob("dolly__ci_run__*"))
    assert len(outputs) == 1 and (outputs[0] / "model.safetensors").exists()
    for instruction in EXAMPLE_INSTRUCTIONS:
        assert f"Instruction: {instruction}" in result.stdout
    assert re.search(r"\d+/\d+ \[", result.stderr)  # the Trainer's progress bar
    # The run is in a local MLflow store under the training root, with its evaluation before and after training.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ci run").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {"eval_trained_response_loss", "eval_baseline_response_loss", "loss"} <= set(runs[0].data.metrics)
    assert "held-out records of" in result.stdout and (outputs[0] / "evaluation.json").exists()
    assert "## Evaluation" in (outputs[0] / "README.md").read_text()
    # A log a person can read: none of the old noise, each rank-0 line once, other ranks' lines only when warnings.
    log = result.stdout + result.stderr
    for line in NOT_IN_THE_LOG:
        assert line not in log, line
    for line in RANK_ZERO_LINES:
        assert log.count(line) == 1, (line, log.count(line))
    assert not [line for line in log.splitlines() if "[rank 1]" in line and " INFO " in line]


@pytest.mark.launch
def test_launch_cell_fails_with_the_failing_ranks_error(tiny_model_dir, sample_path, tmp_path, capsys):
    from training.driver.launch import TrainingFailedError, launch_training

    data = tmp_path / "bad.jsonl"
    data.write_text(sample_path.read_text().splitlines()[0] + '\n{"instruction": "x", "context": "", "response": 5}\n')
    out = tmp_path / "out"
    plan = notebook_plan(
        input_model=str(tiny_model_dir),
        gpu_family="cpu",
        num_gpus="2",
        training_dataset=str(data),
        paths=RunPaths(str(out), None, str(out / "runs")),
        overrides={"test_size": 0},
    )
    with pytest.raises(TrainingFailedError) as failure:
        launch_training(plan)
    message = str(failure.value)
    assert "the launcher exited with code 1" in message
    assert f"{data}, line 2: field 'response' must be a string, got int" in message, message
    assert "exits with return code = 1" in message
    assert "line 2: field 'response'" in capsys.readouterr().err  # the output was streamed through as well


def test_launch_cell_never_reports_success_without_a_finished_model(tmp_path):
    from training.driver.launch import TrainingFailedError, run_launcher

    with pytest.raises(TrainingFailedError, match="exited 0 but .* holds no finished model"):
        run_launcher([sys.executable, "-c", "print('pretending')"], tmp_path, cwd=tmp_path, env=dict(os.environ))
    (tmp_path / "config.json").write_text("{}")
    run_launcher([sys.executable, "-c", "print('done')"], tmp_path, cwd=tmp_path, env=dict(os.environ))


def test_a_launch_an_earlier_run_left_running_is_reported_and_can_be_stopped(tmp_path, caplog):
    import subprocess
    import sys

    from training.driver.launch_records import record_launch, running_launches, stop_launch, warn_about_running_launches

    out = tmp_path / "root" / "dolly__earlier"
    # A launch in a session of its own, as the notebook starts one, forgotten by a restarted kernel.
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        record_launch(earlier.pid, out, "deepspeed ...")
        later = tmp_path / "root" / "dolly__later"
        assert [record.pid for record in warn_about_running_launches(later)] == [earlier.pid]
        assert f"An earlier launch is still running (pid {earlier.pid}" in caplog.text
        assert f"stop_launch({earlier.pid})" in caplog.text
        stop_launch(earlier.pid, grace_s=10)
        assert earlier.wait(timeout=10) != 0
        assert running_launches(later) == [] and not list((tmp_path / "root" / ".dolly-launches").iterdir())
    finally:
        earlier.kill()


def test_the_register_model_widget_reaches_the_trainer_and_a_bad_name_stops_the_plan():
    plan = notebook_plan(
        input_model="EleutherAI/pythia-2.8b",
        gpu_family="a100",
        paths=PATHS,
        overrides={"register_model": "main.default.dolly"},
    )
    command = launcher_command(plan)
    assert command[command.index("--register-model") + 1] == "main.default.dolly"
    with pytest.raises(SettingsError, match="a Unity Catalog model name has three parts"):
        notebook_plan(input_model="x", gpu_family="a100", paths=PATHS, overrides={"register_model": "main.dolly"})


def test_a_driver_without_a_gpu_skips_answering_for_a_gpu_run_and_says_why(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = driver_generation_problem("a100", "/dbfs/runs/dolly")
    assert reason.startswith("Skipped here: this notebook's process has no GPU, and the model trained on a100 GPUs")
    assert "python -m training.evaluate /dbfs/runs/dolly" in reason
    assert driver_generation_problem("cpu", "/tmp/out") is None  # a CPU run answers where it trained
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert driver_generation_problem("a100", "/dbfs/runs/dolly") is None
