"""A stop that stops: SIGTERM to the launcher, or an interrupted notebook cell, ends every rank after its step with a
complete checkpoint there and no finished model; ``--resume`` then ends where an uninterrupted run ends. A second
signal, or the grace period running out, ends a rank at once, keeping the last complete checkpoint.

The stops are real signals to the real launcher processes, sent at deterministic points by ``fault_injection``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    PROJECT_ROOT,
    TEST_DIR,
    assert_ok,
    assert_resumed_like_uninterrupted,
    max_weight_difference,
    run_trainer,
    subprocess_env,
    trainer_command,
    zero3_run_args,
)

from training.driver.plan import free_port
from training.rank.checkpoints import COMPLETE_MARKER
from training.rank.saving import is_finished_output
from training.rank.stopping import STOP_FILE_NAME, STOPPED_EXIT_CODE, StopRequests

SHARED_RUN_STEPS = 4  # conftest's zero3_run: the uninterrupted reference
STOPPED_AT = 3  # the faults below stop the run while step 3 runs
RANKS_GONE_WITHIN_S = 30  # after DeepSpeed's runner exits at once, its ranks finish their step and exit themselves
LONG_STEP_S = 35  # a step longer than the 30 s DeepSpeed's per-node launcher and torchrun give their ranks


def rank_processes(root: psutil.Process, count: int, timeout: float = 120) -> list[psutil.Process]:
    """The training ranks under ``root`` (waits until ``count`` have started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = [
            child
            for child in root.children(recursive=True)
            if "-m" in (command := child.cmdline()) and command[command.index("-m") + 1] == "fault_injection"
        ]
        if len(ranks) == count:
            return ranks
        time.sleep(0.1)
    raise AssertionError(f"{count} ranks did not start under pid {root.pid}")


def alive(processes: list[psutil.Process]) -> list[int]:
    return [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def assert_stopped_with_a_checkpoint(out: Path, log: str, step: int = STOPPED_AT) -> None:
    assert (out / f"checkpoint-{step}" / COMPLETE_MARKER).exists(), log[-4000:]
    assert not is_finished_output(out)  # nothing published
    assert f"stopped at step {step}: run again with --resume" in log


def run_stopped_then_resume(args: list[str], out: Path, zero3_run) -> None:
    """The stopped run resumed on the same ranks ends as the uninterrupted run did."""
    resumed = run_trainer(args + ["--resume"], ranks=2)
    assert_ok(resumed)
    assert_resumed_like_uninterrupted(zero3_run.out, out, resumed, resumed_from=STOPPED_AT, steps=SHARED_RUN_STEPS)


@pytest.mark.launch
def test_sigterm_to_the_deepspeed_launcher_stops_every_rank_after_its_step(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "out"
    args = zero3_run_args(tiny_model_dir, sample_path, out)
    log = tmp_path / "stopped.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(
            trainer_command(args, ranks=2, launcher="deepspeed", module="fault_injection"),
            cwd=PROJECT_ROOT,
            # The step the stop lands in lasts longer than the 30 s DeepSpeed's per-node launcher gives its ranks.
            env=subprocess_env(DOLLY_FAULT="signal-launcher-at:2", DOLLY_FAULT_PAUSE_S=str(LONG_STEP_S)),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        ranks = rank_processes(psutil.Process(launcher.pid), 2)
        code = launcher.wait(timeout=300)
        exited_at = time.monotonic()
        # DeepSpeed's runner has no handler on one node: SIGTERM ends it at once. Its ranks notice it is gone, finish
        # the step they are in, write a checkpoint there and exit; none trains on as an orphan, and nothing cuts the
        # long step short.
        assert code == -signal.SIGTERM, log.read_text()[-3000:]
        while alive(ranks) and time.monotonic() - exited_at < LONG_STEP_S + RANKS_GONE_WITHIN_S:
            time.sleep(0.2)
        assert not alive(ranks), log.read_text()[-3000:]
    marker = out / f"checkpoint-{STOPPED_AT}" / COMPLETE_MARKER
    print(
        f"ranks gone {time.monotonic() - exited_at:.1f} s after the runner exited; checkpoint complete "
        f"{marker.stat().st_mtime - (time.time() - (time.monotonic() - exited_at)):.1f} s after the signal"
    )
    text = log.read_text()
    assert "the launcher that started this rank exited" in text
    assert_stopped_with_a_checkpoint(out, text)  # (resuming a stopped run: the notebook-cell test below)


@pytest.mark.launch
def test_sigterm_to_torchrun_stops_every_rank_before_torchrun_exits(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "out"
    args = zero3_run_args(tiny_model_dir, sample_path, out)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "fault_injection",
        *args,
    ]
    log = tmp_path / "stopped.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=subprocess_env(DOLLY_FAULT="signal-launcher-at:2"),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        ranks = rank_processes(psutil.Process(launcher.pid), 2)
        code = launcher.wait(timeout=300)
        assert not alive(ranks), "a rank outlived torchrun"  # torchrun passes SIGTERM on and waits for its workers
    text = log.read_text()
    # torchrun itself exits with 1 (its SignalException), after its workers: theirs is the stopped line below.
    assert code == 1, text[-3000:]
    assert_stopped_with_a_checkpoint(out, text)  # (resuming a stopped run is tested above and below)


@pytest.mark.launch
def test_an_interrupted_notebook_launch_cell_stops_the_ranks_and_waits_for_them(
    tiny_model_dir, sample_path, tmp_path, zero3_run, monkeypatch
):
    import training.driver.launch as launch
    from training.driver.plan import LaunchPlan
    from training.settings import TrainSettings, given_settings
    from training.trainer import main

    out = tmp_path / "out"
    args = zero3_run_args(tiny_model_dir, sample_path, out)
    plan = LaunchPlan(
        TrainSettings(**given_settings(main.make_context("trainer", list(args)))), processes_per_node=2, use_gpu=False
    )
    monkeypatch.setattr(launch, "TRAINER_MODULE", "fault_injection")  # the trainer, with the pause below
    monkeypatch.setenv("DOLLY_FAULT", "pause-for-stop-file-at:2")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TEST_DIR), os.environ.get("PYTHONPATH", "")]))

    def interrupt_when_paused() -> None:  # what the notebook's interrupt button does to the kernel: SIGINT
        while not (out / ".paused-rank0").exists():
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_paused, daemon=True).start()
    children_before = set(psutil.Process().children(recursive=True))
    with pytest.raises(
        launch.TrainingStopped, match=f"training stopped at step {STOPPED_AT} .*run again with --resume"
    ):
        launch.launch_training(plan)
    # The cell returned only after every process of the launch had exited.
    assert not alive([p for p in psutil.Process().children(recursive=True) if p not in children_before])
    assert (out / f"checkpoint-{STOPPED_AT}" / COMPLETE_MARKER).exists() and not is_finished_output(out)
    assert not (out / STOP_FILE_NAME).exists()  # the request was taken back
    run_stopped_then_resume(args, out, zero3_run)


@pytest.mark.launch
def test_a_step_that_outlasts_the_grace_period_is_stopped_at_once(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "out"
    args = zero3_run_args(tiny_model_dir, sample_path, out, "--stop-grace-period", "2")
    started = time.monotonic()
    result = run_trainer(
        args, ranks=2, launcher="deepspeed", module="fault_injection", env={"DOLLY_FAULT": "hang-at:2"}
    )
    assert result.returncode == STOPPED_EXIT_CODE, result.stderr[-3000:]
    assert time.monotonic() - started < 120
    assert "Stopping at once (the grace period is over)" in result.stderr
    assert (out / "checkpoint-2" / COMPLETE_MARKER).exists()  # the last complete checkpoint stays
    assert not (out / "checkpoint-3").exists() and not is_finished_output(out)


# ---- the stop requests themselves, in this process ----


class StoppedAtOnce(Exception):
    pass


@pytest.fixture
def stops(tmp_path, monkeypatch):
    import training.rank.stopping as stopping

    def record_exit(code):
        raise StoppedAtOnce(code)

    monkeypatch.setattr(stopping, "end_process", record_exit)
    with StopRequests(tmp_path, grace_period_s=60) as requests:
        requests.training = True  # as once the Trainer's loop has begun
        yield requests


def test_a_signal_asks_once_and_a_second_one_later_stops_at_once(stops, monkeypatch):
    import training.rank.stopping as stopping

    os.kill(os.getpid(), signal.SIGTERM)
    assert stops.requested and "SIGTERM" in stops.reason
    os.kill(os.getpid(), signal.SIGINT)  # a launcher passing the same stop on: still one request
    monkeypatch.setattr(stopping, "SAME_STOP_WITHIN_S", 0.0)
    with pytest.raises(StoppedAtOnce) as stopped:
        os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.args == (STOPPED_EXIT_CODE,)


def test_the_stop_file_asks_the_main_process_and_is_taken_back(stops, tmp_path):
    assert not stops.agreed()
    (tmp_path / STOP_FILE_NAME).write_text("{}")
    assert stops.agreed() and STOP_FILE_NAME in stops.reason
    stops.done()
    assert not (tmp_path / STOP_FILE_NAME).exists()


def test_a_signal_before_training_began_ends_the_rank_at_once(tmp_path, monkeypatch):
    """Nothing to finish or save yet: a launcher tearing down a run whose other rank failed is obeyed at once."""
    import training.rank.stopping as stopping

    def record_exit(code):
        raise StoppedAtOnce(code)

    monkeypatch.setattr(stopping, "end_process", record_exit)
    with StopRequests(tmp_path, grace_period_s=60), pytest.raises(StoppedAtOnce):
        os.kill(os.getpid(), signal.SIGTERM)


def test_signal_handlers_are_given_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests(tmp_path, grace_period_s=60):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_file_is_tied_to_its_launch_not_to_clocks(tmp_path, caplog):
    """At start, a stop file naming this launch is kept (the ranks stop before their first step); one naming another
    launch, or none, is removed with a log line, however new it is. During the run, one naming this launch or none
    asks; one naming another launch does not."""
    import json

    stop_file = tmp_path / STOP_FILE_NAME
    stop_file.write_text(json.dumps({"launch_id": "this"}))
    with StopRequests(tmp_path, grace_period_s=60, launch_id="this") as requests:
        assert stop_file.exists() and requests.stop_file_asks()
    assert "it came before the ranks started, so they stop before their first step" in caplog.text
    for left_over in ({"launch_id": "earlier"}, {}):
        stop_file.write_text(json.dumps(left_over))  # written a moment ago: the clock has no say
        with StopRequests(tmp_path, grace_period_s=60, launch_id="this") as requests:
            assert not stop_file.exists() and not requests.stop_file_asks()
    assert "a stop request to launch earlier, not to this launch (this)" in caplog.text
    assert "a stop request to no launch in particular" in caplog.text
    with StopRequests(tmp_path, grace_period_s=60, launch_id="this") as requests:
        stop_file.write_text(json.dumps({"launch_id": "another"}))
        assert not requests.stop_file_asks()
        stop_file.write_text("")  # `touch OUTPUT/.dolly-stop` while it runs
        assert requests.stop_file_asks()
        stop_file.write_text(json.dumps({"launch_id": "this"}))
        assert requests.stop_file_asks()


@pytest.mark.launch
def test_a_stop_written_before_the_ranks_start_stops_them_before_any_step_and_says_nothing_was_trained(
    tiny_model_dir, sample_path, tmp_path
):
    """The notebook's stop for this launch, written while Spark schedules the ranks: they start, stop before their
    first step, write nothing, and the launch's error says there is nothing to resume."""
    from training.driver.launch_outcome import request_stop, stopped_error

    out = tmp_path / "out"
    request_stop(out, "launch-a")
    args = zero3_run_args(tiny_model_dir, sample_path, out, "--launch-id", "launch-a")
    run = run_trainer(args, ranks=2, launcher="deepspeed")  # it passes the ranks' exit code on
    log = run.stdout + run.stderr
    assert run.returncode == STOPPED_EXIT_CODE, log[-4000:]
    assert "stopped before its first step: nothing was trained, there is nothing to resume" in log
    assert "'loss'" not in log and not list(out.glob("checkpoint-*")) and not is_finished_output(out)
    assert not (out / STOP_FILE_NAME).exists()  # answered
    assert "nothing was trained, there is nothing to resume; launch it again" in str(stopped_error(out, "a stop"))


@pytest.mark.launch
def test_a_stop_on_an_evaluation_step_saves_without_evaluating_and_a_stale_stop_file_does_not_stop_the_resume(
    tiny_model_dir, sample_path, tmp_path
):
    out = tmp_path / "out"
    args = zero3_run_args(tiny_model_dir, sample_path, out)  # evaluates at steps 2 and 4

    def stop_when_paused() -> None:  # the notebook's stop: the stop file, while step 2 runs
        while not (out / ".paused-rank0").exists():
            time.sleep(0.1)
        (out / STOP_FILE_NAME).write_text("{}")

    threading.Thread(target=stop_when_paused, daemon=True).start()
    stopped = run_trainer(
        args, ranks=2, launcher="deepspeed", module="fault_injection", env={"DOLLY_FAULT": "pause-for-stop-file-at:1"}
    )
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == STOPPED_EXIT_CODE, log[-4000:]
    assert_stopped_with_a_checkpoint(out, log, step=2)
    assert "eval_loss" not in log  # step 2 is an evaluation step: the checkpoint came without the evaluation

    (out / STOP_FILE_NAME).write_text(
        '{"launch_id": "an-earlier-launch"}'
    )  # a notebook that died before taking it back
    resumed = run_trainer(args + ["--resume"], ranks=2)
    assert_ok(resumed)
    assert "a stop request to launch an-earlier-launch, not to this launch" in resumed.stdout + resumed.stderr
    assert is_finished_output(out) and (out / "checkpoint-4" / COMPLETE_MARKER).exists()


@pytest.mark.launch
def test_a_sigterm_to_the_whole_launch_while_publishing_ends_finished_or_resumable_and_says_which(
    tiny_model_dir, sample_path, tmp_path, zero3_run
):
    """SIGTERM to every process of a launch (a cluster shutdown) while the finished model is being saved: within the
    grace period the publish finishes and the notebook's launch reports a finished run; past it, the ranks end with
    the last complete checkpoint (the final step's), the launch reports a stop, and --resume publishes."""
    import training.driver.launch as launch

    def launch_with_the_signal(out: Path, *extra: str, pause_s: float) -> None:
        args = zero3_run_args(tiny_model_dir, sample_path, out, *extra)
        env = subprocess_env(DOLLY_FAULT="signal-group-while-publishing:0", DOLLY_FAULT_PAUSE_S=str(pause_s))
        launch.run_launcher(
            trainer_command(args, ranks=2, launcher="deepspeed", module="fault_injection"),
            out,
            cwd=PROJECT_ROOT,
            env=env,
        )

    finished = tmp_path / "finished"
    launch_with_the_signal(finished, pause_s=3)  # returns: a finished run, though its launcher was killed
    assert is_finished_output(finished)
    assert max_weight_difference(zero3_run.out / "model.safetensors", finished / "model.safetensors") <= 1e-6

    cut = tmp_path / "cut"
    with pytest.raises(launch.TrainingStopped, match=f"training stopped at step {SHARED_RUN_STEPS} "):
        launch_with_the_signal(cut, "--stop-grace-period", "2", pause_s=8)
    assert not is_finished_output(cut) and (cut / f"checkpoint-{SHARED_RUN_STEPS}" / COMPLETE_MARKER).exists()
    resumed = run_trainer(zero3_run_args(tiny_model_dir, sample_path, cut, "--resume"), ranks=2)
    assert_ok(resumed)
    assert max_weight_difference(zero3_run.out / "model.safetensors", cut / "model.safetensors") <= 1e-6
