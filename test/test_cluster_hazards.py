"""What clusters do to runs besides stopping them: a first op build killed part-way, two runs on one machine, a disk
too small for the run's checkpoints."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    CPU_ZERO3_CONFIG,
    NOTEBOOK,
    PROJECT_ROOT,
    assert_ok,
    invoke_trainer,
    quick_training_args,
    run_trainer,
    subprocess_env,
    trainer_command,
)

from training.driver.notebook import RunPaths, claim_run_dir
from training.driver.plan import LaunchPlan
from training.rank.disk_check import checkpoint_bytes, parameter_counts
from training.rank.op_builds import build_locks
from training.settings import TrainSettings

# A launch that builds DeepSpeed's CPU communication op afresh (about 30 s here) and trains one step finished in
# about 60 s on the 2-core machine; the bound leaves room for a slow, busy machine.
NEXT_LAUNCH_WITHIN_S = 240


@pytest.mark.launch
def test_a_launch_killed_during_its_first_op_build_does_not_hang_the_next(tiny_model_dir, sample_path, tmp_path):
    extensions = tmp_path / "torch_extensions"  # fresh: DeepSpeed builds its CPU communication op on first use
    env = {"TORCH_EXTENSIONS_DIR": str(extensions)}

    def args(out: str) -> list[str]:
        return quick_training_args(
            tiny_model_dir,
            sample_path,
            tmp_path / out,
            "--deepspeed",
            str(CPU_ZERO3_CONFIG),
            "--max-steps",
            "1",
            "--test-size",
            "0",
            "--no-mlflow",
        )

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            trainer_command(args("first"), ranks=2, launcher="deepspeed"),
            cwd=PROJECT_ROOT,
            env=subprocess_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while not build_locks(extensions):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the launch, its ranks and the compiler, mid-build
        first.wait()
    assert build_locks(extensions), "the killed build left no lock: nothing was tested"

    started = time.monotonic()
    second = run_trainer(args("second"), ranks=2, launcher="deepspeed", env=env, timeout=NEXT_LAUNCH_WITHIN_S)
    elapsed = time.monotonic() - started
    assert_ok(second)
    print(f"the next launch finished in {elapsed:.0f} s")
    assert "a build lock its builder left when it was stopped" in second.stderr
    assert not build_locks(extensions)


def test_only_local_rank_0_clears_build_locks_and_builds_go_to_this_hosts_folder(tmp_path, monkeypatch):
    import socket

    from training.rank import op_builds

    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")  # no process holds it: a killed build's leftover
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert op_builds.prepare_op_builds() == [] and lock.exists()  # not this rank's to clear
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert op_builds.prepare_op_builds() == [lock] and not lock.exists()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert op_builds.use_host_build_folder().name == socket.gethostname()  # never another node's builds


@pytest.mark.launch
def test_two_notebook_runs_at_once_each_finish_with_their_own_model(tiny_model_dir, sample_path, tmp_path):
    data = tmp_path / "twelve.jsonl"  # a shorter run than the sample's: 8 records to train on, 4 held out
    data.write_text("\n".join(sample_path.read_text().splitlines()[:12]) + "\n")
    env = subprocess_env(DOLLY_NO_ENV_SETUP="1", DOLLY_INPUT_MODEL=str(tiny_model_dir))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MASTER_PORT", None)
    command = [
        sys.executable,
        str(NOTEBOOK),
        "--local_training_root",
        str(tmp_path / "runs"),
        "--experiment_id",
        "twin",
        "--training_dataset",
        str(data),
        "--num_gpus",
        "1",  # one rank each: two runs' ranks on the 2 cores, not four
    ]
    with contextlib.ExitStack() as files:
        logs = [files.enter_context(open(tmp_path / f"notebook{i}.log", "w")) for i in range(2)]
        runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
        codes = [run.wait(timeout=900) for run in runs]
    texts = [(tmp_path / f"notebook{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    outputs = sorted((tmp_path / "runs").glob("dolly__twin__*"))
    assert len(outputs) == 2 and all((output / "model.safetensors").exists() for output in outputs)
    ports = [text.split("--master_port ", 1)[1].split()[0] for text in texts]
    assert ports[0] != ports[1]  # each run its own rendezvous, not DeepSpeed's default 29500


@pytest.mark.launch
def test_a_publish_longer_than_the_collective_timeout_ends_with_every_rank_exited_0_and_a_complete_copy(
    tiny_model_dir, sample_path, tmp_path
):
    """Rank 0 logs the MLflow model for 18 s (a slow upload) with collectives timing out after 10 s: the other rank
    waits through the hand-off's heartbeat, not a collective, so every rank exits 0 and the copy is complete."""
    from helpers import assert_ok, run_trainer, zero3_run_args

    from training.folder_commit import is_complete

    out, copy = tmp_path / "out", tmp_path / "volume" / "copy"
    args = zero3_run_args(
        tiny_model_dir,
        sample_path,
        out,
        "--max-steps",
        "2",
        "--collective-timeout",
        "10",
        "--dbfs-output-dir",
        str(copy),
        mlflow=True,
    )
    env = {"DOLLY_FAULT": "slow-mlflow-upload:18", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    run = run_trainer(args, ranks=2, launcher="deepspeed", module="fault_injection", env=env)
    assert_ok(run)
    log = run.stdout + run.stderr
    assert log.count("exits successfully") == 2 and "Timed out" not in log, log[-3000:]  # both ranks exited 0
    assert is_complete(copy) and (copy / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert not list(copy.parent.glob(".building-*"))


def test_each_launch_picks_its_own_port_unless_one_is_given(tmp_path, monkeypatch):
    settings = TrainSettings(local_output_dir=str(tmp_path))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    plan = LaunchPlan(settings, processes_per_node=2, use_gpu=False)
    ports = {plan.rendezvous_port() for _ in range(5)}
    assert len(ports) > 1 and 29500 not in ports
    assert LaunchPlan(settings, processes_per_node=2, use_gpu=False, master_port=31000).rendezvous_port() == 31000
    monkeypatch.setenv("MASTER_PORT", "32000")
    assert plan.rendezvous_port() == 32000


def test_two_runs_started_in_the_same_second_get_a_folder_each(tmp_path):
    paths = RunPaths(str(tmp_path / "dolly__T"), str(tmp_path / "dbfs" / "dolly__T"), str(tmp_path / "dolly__T/runs"))
    first, second = claim_run_dir(paths), claim_run_dir(paths)
    assert first.local_output_dir == str(tmp_path / "dolly__T")
    assert second.local_output_dir == str(tmp_path / "dolly__T-2")
    assert second.dbfs_output_dir.endswith("dolly__T-2") and second.tensorboard_display_dir.endswith("dolly__T-2/runs")


# ---- the disk check ----


def directory_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_the_checkpoint_estimate_is_close_to_a_real_checkpoint(zero3_run):
    from training.settings import given_settings
    from training.trainer import main

    settings = TrainSettings(**given_settings(main.make_context("trainer", list(zero3_run.args))))
    estimate = checkpoint_bytes(parameter_counts(settings), settings, "fp32", world_size=2)
    actual = directory_bytes(zero3_run.out / "checkpoint-2")
    print(f"checkpoint estimate {estimate} bytes, on disk {actual} bytes ({estimate / actual - 1:+.1%})")
    assert abs(estimate / actual - 1) <= 0.25


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 3 MB filesystem (tmpfs), mounted for the test; skipped where mounting is refused."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_run_whose_checkpoints_cannot_fit_is_refused_before_its_model_is_loaded(
    tiny_model_dir, sample_path, small_filesystem, tmp_path
):
    out = small_filesystem / "out"
    # The prepared data elsewhere: this process keeps it mapped after the run, which would keep the mount busy.
    cache = ["--dataset-cache-dir", str(tmp_path / "prepared")]
    run = invoke_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--no-mlflow", *cache))
    assert run.exit_code == 1, run.log[-3000:]
    assert "this run needs about" in run.log and f"free on the filesystem of {out}" in run.log
    assert "lower --save-total-limit" in run.log and "--no-disk-check" in run.log
    assert "Training in" not in run.log and "Loading model" not in run.log
    assert not list(out.glob("checkpoint-*"))
