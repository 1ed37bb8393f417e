"""A stop that stops: SIGTERM or SIGINT, the output folder's stop file, or the launcher going away, and the run ends
at the end of the optimizer step it is in, with a complete checkpoint there and no finished model.

How a stop travels:

- **Requests.** A rank notes a request when it gets SIGTERM or SIGINT (a cancelled job, a reclaimed spot node,
  ``scancel``, an evicted pod, Ctrl-C), when the launcher that started it exits (DeepSpeed's ``deepspeed`` runner
  exits at once on SIGTERM without telling its ranks: they watch for it), or, on rank 0, when the output folder
  holds :data:`STOP_FILE_NAME` (how the notebook stops ranks on other nodes: the folder is on shared storage).
- **Agreement.** At the end of every optimizer step the ranks all-reduce their requests (one integer), so every rank
  stops after the same step; the Trainer then saves a checkpoint there (marked complete once every rank wrote its
  part) and leaves its loop. The run publishes nothing, exits with :data:`STOPPED_EXIT_CODE`, and its last log line
  is "stopped at step N: run again with --resume". A stop on an evaluation step saves without evaluating.
- **Whose stop.** A stop is tied to its launch, not to clocks: each launch has an id (``--launch-id``, from the launch
  plan), and the stop file names the launch it stops. A stop file for this launch found at start (written while Spark
  was still scheduling the ranks, or a cluster scaling up) stops the ranks before their first step; one naming
  another launch, or none, found at start is removed with a log line (a notebook that died before taking its stop
  back must not stop the next ``--resume``). During the run, a stop file naming this launch or none (``touch``) asks.
- **At once.** A second signal (more than :data:`SAME_STOP_WITHIN_S` after the first: launchers pass one signal on
  as another) or the grace period running out (``--stop-grace-period``) ends the rank at once, leaving the last
  complete checkpoint as it is.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .distributed import end_process, is_distributed, is_main_process

logger = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): a temporary failure, the user is invited to retry; here, to run again with --resume.
STOPPED_EXIT_CODE = 75
STOP_FILE_NAME = ".dolly-stop"
NOTHING_TRAINED = "nothing was trained, there is nothing to resume"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Launchers pass a stop on: Ctrl-C reaches every process of the group, then DeepSpeed's launch.py sends SIGTERM too.
SAME_STOP_WITHIN_S = 2.0
LAUNCHER_POLL_S = 1.0
# Command-line words of the processes that start ranks: their exit means the run has been stopped.
LAUNCHER_MARKS = ("deepspeed.launcher", "bin/deepspeed", "torch.distributed.run", "bin/torchrun")


class RunStopped(Exception):
    """The run stopped on request after a complete checkpoint at ``step``; nothing was published."""

    def __init__(self, step: int, reason: str, *, nothing_trained: bool = False):
        if nothing_trained:
            message = f"stopped before its first step: {NOTHING_TRAINED} ({reason})"
        else:
            message = f"stopped at step {step}: run again with --resume ({reason})"
        super().__init__(message)
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class Launcher:
    pid: int
    started: float
    command: str


def launcher_ancestors() -> list[Launcher]:
    """The processes above this one that started it as a rank (DeepSpeed's runner and launch, torchrun)."""
    import psutil

    found = []
    process = psutil.Process().parent()
    while process is not None:
        try:
            command = " ".join(process.cmdline())
            if not any(mark in command for mark in LAUNCHER_MARKS):
                break
            found.append(Launcher(process.pid, process.create_time(), command[:120]))
            process = process.parent()
        except psutil.Error:
            break
    return found


def launcher_alive(launcher: Launcher) -> bool:
    import psutil

    try:
        return psutil.Process(launcher.pid).create_time() == launcher.started
    except psutil.Error:
        return False


class StopRequests:
    """This rank's stop requests (signals, the stop file, the launcher's exit), and stopping at once when asked twice
    or when the grace period is over. A context manager: signal handlers and the launcher watch are undone on exit."""

    def __init__(self, output_dir: str | os.PathLike, grace_period_s: float, launch_id: str | None = None):
        self.stop_file = Path(output_dir) / STOP_FILE_NAME
        self.grace_period_s = grace_period_s
        self.launch_id = launch_id
        self.reason: str | None = None
        self.training = False  # set when the Trainer's loop begins (StopAtStepEnd)
        self._first_at: float | None = None
        self._timer: threading.Timer | None = None
        self._previous_handlers: dict[int, object] = {}
        self._watching = threading.Event()

    # ---- requests ----

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        """Note a stop request; the first starts the grace period. Before training has begun there is no step to
        finish and nothing new to save: the rank ends at once (as a launcher tearing a failed run down expects)."""
        if self.requested:
            return
        if not self.training:
            self.stop_now(f"{reason}, before training began")
        self._note(reason)

    def _note(self, reason: str) -> None:
        if self.requested:
            return
        self.reason = reason
        self._first_at = time.monotonic()
        logger.warning(
            "Stop requested (%s): stopping after this optimizer step, with a checkpoint there; at once after %.0f s "
            "or on a second signal",
            reason,
            self.grace_period_s,
        )
        self._timer = threading.Timer(self.grace_period_s, self.stop_now, args=("the grace period is over",))
        self._timer.daemon = True
        self._timer.start()

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.request(f"{name} to rank pid {os.getpid()}")
        elif time.monotonic() - (self._first_at or 0.0) > SAME_STOP_WITHIN_S:
            self.stop_now(f"a second signal ({name})")

    def stop_file_launch(self) -> tuple[bool, str | None]:
        """Whether the stop file is there, and the launch it names (None: none, or unreadable yet)."""
        try:
            text = self.stop_file.read_text()
        except FileNotFoundError:
            return False, None
        except OSError:
            return True, None
        try:
            named = json.loads(text).get("launch_id")
        except (ValueError, AttributeError):
            named = None
        return True, named

    def stop_file_asks(self) -> bool:
        """Whether the output folder's stop file asks this run to stop (read by the main process): it names this
        launch, or none."""
        there, named = self.stop_file_launch()
        return there and named in (None, self.launch_id)

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """Whether any rank has a stop request: collective, call it on every rank at the same point."""
        if is_main_process() and not self.requested and self.stop_file_asks():
            self._note(f"{self.stop_file} asks for it")
        if not is_distributed():
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not self.requested:
            self._note("another rank was asked to stop")
        return bool(flag.item())

    def stop_now(self, why: str) -> None:
        """End this rank at once; the last complete checkpoint stays as it is."""
        logger.error("Stopping at once (%s): the last complete checkpoint stays; run again with --resume", why)
        end_process(STOPPED_EXIT_CODE)

    # ---- installing ----

    def _watch_launchers(self, launchers: list[Launcher]) -> None:
        while not self._watching.wait(LAUNCHER_POLL_S):
            gone = next((launcher for launcher in launchers if not launcher_alive(launcher)), None)
            if gone is not None:
                self.request(f"the launcher that started this rank exited (pid {gone.pid}: {gone.command})")
                return

    def settle_stop_file_at_start(self) -> None:
        """The stop file found as the run starts (main process): kept when it names this launch (the ranks then stop
        before their first step), removed with a log line otherwise (it stops another launch, or names none: no one
        could name this launch before it began)."""
        if not is_main_process():
            return
        there, named = self.stop_file_launch()
        if not there:
            return
        if named is not None and named == self.launch_id:
            logger.warning(
                "%s asks this launch (%s) to stop: it came before the ranks started, so they stop before their first "
                "step",
                self.stop_file,
                named,
            )
            return
        self.stop_file.unlink(missing_ok=True)
        logger.warning(
            "Removed %s: a stop request to %s, not to this launch (%s)",
            self.stop_file,
            f"launch {named}" if named else "no launch in particular, left from before this launch began",
            self.launch_id or "unnamed",
        )

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        launchers = launcher_ancestors()
        self.settle_stop_file_at_start()
        if launchers:
            threading.Thread(target=self._watch_launchers, args=(launchers,), daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._watching.set()
        if self._timer is not None:
            self._timer.cancel()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def done(self) -> None:
        """The stop is complete: the request the stop file made is answered (the main process removes it)."""
        if self._timer is not None:
            self._timer.cancel()
        if is_main_process():
            self.stop_file.unlink(missing_ok=True)


class StopAtStepEnd(TrainerCallback):
    """At the end of each optimizer step, the ranks agree whether to stop; if so the Trainer saves and leaves."""

    def __init__(self, stops: StopRequests):
        self.stops = stops

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.stops.training = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.stops.agreed(args.device):
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the checkpoint first: an evaluation could outlast the grace period
