"""Killed runs resume to the model an uninterrupted run makes; one run per output folder; failed saves lose nothing.

The kills are real SIGKILLs, sent at deterministic points by ``fault_injection`` (see that module).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time

import pytest
from helpers import (
    CPU_ZERO3_CONFIG,
    PROJECT_ROOT,
    assert_finished,
    assert_ok,
    assert_resumed_like_uninterrupted,
    copy_run,
    invoke_trainer,
    logged,
    lora_run_args,
    max_weight_difference,
    quick_training_args,
    run_killed,
    run_trainer,
    subprocess_env,
    trainer_command,
    zero3_run_args,
)

from training.rank.checkpoints import COMPLETE_MARKER
from training.rank.run_lock import LOCK_FILE_NAME
from training.rank.saving import is_finished_output

# The kills below stop a run with the arguments of a shared uninterrupted 2-rank run (conftest's ``zero3_run`` and
# ``lora_run``: 4 steps, evaluation and a complete checkpoint at steps 2 and 4), which is their reference.
SHARED_RUN_STEPS = 4


@pytest.mark.launch
def test_zero3_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_model(
    tiny_model_dir, sample_path, tmp_path, zero3_run, zero3_killed_at_2
):
    out = copy_run(zero3_killed_at_2, tmp_path / "out")  # killed after checkpoint-2 (conftest)
    args = zero3_run_args(tiny_model_dir, sample_path, out)
    assert (out / "checkpoint-2" / COMPLETE_MARKER).exists() and not (out / "checkpoint-4").exists()

    resumed = run_trainer(args + ["--resume"], ranks=2)
    assert_ok(resumed)
    assert_resumed_like_uninterrupted(zero3_run.out, out, resumed, resumed_from=2, steps=SHARED_RUN_STEPS)


@pytest.mark.launch
def test_zero3_run_killed_while_saving_resumes_from_the_previous_checkpoint(
    tiny_model_dir, sample_path, tmp_path, zero3_run
):
    out = tmp_path / "out"
    args = zero3_run_args(tiny_model_dir, sample_path, out)
    run_killed(args, "kill-while-saving:4")
    half_written = out / "checkpoint-4"
    # Rank 0 wrote its trainer state, so the folder looks whole; rank 1's RNG state is missing and it is unmarked.
    assert (half_written / "trainer_state.json").exists() and not (half_written / "rng_state_1.pth").exists()
    assert not (half_written / COMPLETE_MARKER).exists()

    resumed = run_trainer(args + ["--resume"], ranks=2)
    assert_ok(resumed)
    assert f"Removing incomplete checkpoint {half_written}" in resumed.stderr
    assert_resumed_like_uninterrupted(zero3_run.out, out, resumed, resumed_from=2, steps=SHARED_RUN_STEPS)


def test_lora_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_model(
    tiny_model_dir, sample_path, tmp_path, lora_run, lora_killed_at_2
):
    out = copy_run(lora_killed_at_2, tmp_path / "out")  # the shared LoRA run's arguments, killed after checkpoint-2
    args = lora_run_args(tiny_model_dir, sample_path, out)

    resumed = run_trainer(args + ["--resume"], ranks=2)
    assert_ok(resumed)
    assert_resumed_like_uninterrupted(lora_run.out, out, resumed, resumed_from=2, steps=SHARED_RUN_STEPS)
    # The adapter itself, not only the merged weights, continued where it stopped.
    adapter = "adapter/adapter_model.safetensors"
    assert max_weight_difference(lora_run.out / adapter, out / adapter) <= 1e-5


@pytest.mark.launch
def test_second_run_on_a_busy_output_folder_is_refused_and_a_killed_run_leaves_no_stale_lock(
    tiny_model_dir, sample_path, tmp_path
):
    out = tmp_path / "out"
    # A long single-process run: it holds the lock from its start until it is killed.
    long_args = quick_training_args(
        tiny_model_dir, sample_path, out, "--max-steps", "100000", "--save-steps", "100000", "--test-size", "0"
    )
    running = subprocess.Popen(
        trainer_command(long_args),
        cwd=PROJECT_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE_NAME).exists() or not (out / LOCK_FILE_NAME).read_text():
            assert running.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)

        second = run_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--resume"), ranks=2)
        assert second.returncode != 0
        message = f"another run is writing to {out} (pid {running.pid} on "
        # Both ranks refuse: rank 0 at the lock, rank 1 on reading who holds it.
        assert second.stderr.count(message) >= 2, second.stderr[-4000:]
        assert "Training in" not in second.stderr  # refused at start, before any model was loaded
        assert running.poll() is None  # the first run was not disturbed
    finally:
        running.send_signal(signal.SIGKILL)
        running.wait()

    # The kernel released the killed run's lock: a new run on the folder starts and finishes.
    after_kill = run_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--resume", "--max-steps", "2"))
    assert_ok(after_kill)
    assert is_finished_output(out) and not (out / LOCK_FILE_NAME).exists()


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_save_that_fails_leaves_earlier_checkpoints_and_the_finished_model_intact(
    tiny_model_dir, sample_path, tmp_path
):
    out = tmp_path / "out"
    assert_finished(
        invoke_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--max-steps", "2", "--test-size", "0"))
    )
    finished_weights = (out / "model.safetensors").read_bytes()
    checkpoint = out / "checkpoint-2"
    checkpoint_files = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}

    # The kernel refuses to write a file larger than the model: the next checkpoint's optimizer state fails to save
    # (EFBIG), as it would on a full disk.
    limit = len(finished_weights) + 4096
    # (The limit holds for every file the process writes: MLflow's store is left out, so the checkpoint is what fails.)
    failed = run_trainer(
        quick_training_args(tiny_model_dir, sample_path, out, "--resume", "--test-size", "0", "--no-mlflow"),
        preexec_fn=_limit_file_size(limit),
    )
    assert failed.returncode != 0
    assert f"SaveFailedError: could not write checkpoint-4 in {out}" in failed.stderr, failed.stderr[-3000:]
    assert "The finished model already there is unchanged. Complete checkpoints kept: checkpoint-2." in failed.stderr
    assert (out / "model.safetensors").read_bytes() == finished_weights and is_finished_output(out)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == checkpoint_files
    assert not (out / "checkpoint-4" / COMPLETE_MARKER).exists()

    # With room again, --resume carries on from checkpoint-2 and replaces the finished model.
    assert_finished(
        invoke_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--resume", "--test-size", "0"))
    )
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert os.path.exists(out / "checkpoint-4" / COMPLETE_MARKER)
    assert (out / "model.safetensors").read_bytes() != finished_weights


def deepspeed_schedule(record: dict, steps: int) -> dict[int, float]:
    """The learning rate the run's resolved DeepSpeed scheduler gives each logged step of an uninterrupted run
    (DeepSpeed's own scheduler class, stepped here)."""
    import torch
    from deepspeed.runtime import lr_schedules

    scheduler_config = record["resolved"]["deepspeed_config"]["scheduler"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = getattr(lr_schedules, scheduler_config["type"])(optimizer, **scheduler_config["params"])
    rates = {}
    for step in range(1, steps + 1):
        optimizer.step()
        scheduler.step()
        rates[step] = scheduler.get_last_lr()[0]  # what the Trainer logs at that step
    return rates


@pytest.mark.launch
@pytest.mark.parametrize("scheduler", ["WarmupLR", "WarmupDecayLR"])
def test_the_learning_rate_schedule_carries_over_a_resume_inside_the_warmup(
    scheduler, tiny_model_dir, sample_path, tmp_path
):
    """Dolly's configs warm up, then hold (WarmupLR); a user's may decay (WarmupDecayLR). Resumed at step 2 of a
    3-step warmup, every step's learning rate is the one DeepSpeed's scheduler gives an uninterrupted run."""
    config = json.loads(CPU_ZERO3_CONFIG.read_text())
    config["scheduler"]["type"] = scheduler
    if scheduler == "WarmupDecayLR":
        config["scheduler"]["params"]["total_num_steps"] = "auto"
    config_path = tmp_path / f"{scheduler}.json"
    config_path.write_text(json.dumps(config))
    extra = ["--deepspeed", str(config_path), "--warmup-steps", "3", "--eval-answers", "0", "--no-mlflow"]
    args = zero3_run_args(tiny_model_dir, sample_path, tmp_path / "out", *extra)
    out = tmp_path / "out"
    run_killed(args, "kill-after-checkpoint:2")
    assert_ok(run_trainer(args + ["--resume"], ranks=2))
    expected = deepspeed_schedule(json.loads((out / "run_config.json").read_text()), steps=4)
    assert len(set(expected.values())) >= 3  # a schedule, not a constant
    assert logged(out, "learning_rate") == pytest.approx(expected, rel=1e-6)
