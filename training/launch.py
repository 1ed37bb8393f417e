"""Running the training launcher from the notebook, and telling the truth about how it ended.

The launcher's output is streamed through unchanged (progress bars included) while its tail is kept. If it fails,
the error names the failing rank's exception, not a later "no model found"; if it exits 0, the output folder must
hold a finished model.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO

from .saving import is_finished_output

logger = logging.getLogger(__name__)

TAIL_LINES = 400
RANK_EXIT = re.compile(r"exits with return code = (-?\d+)")
# What a failing rank prints last: an exception line (``module.Name: message``) or a native abort.
ERROR_LINE = re.compile(r"^(?:\[rank\d+\]: )?((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b.*"
                        r"|terminate called.*|Fatal Python error.*)$")


def free_port() -> int:
    """A free TCP port on the loopback address, for a launcher's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TrainingFailedError(RuntimeError):
    """The training launcher failed, or said it succeeded without a finished model."""


def _tee(source: IO[bytes], sink: IO[str], tail: deque[str]) -> None:
    """Copy ``source`` to ``sink`` as it arrives (carriage returns kept), remembering its last lines."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := source.read1(65536):
        text = decoder.decode(chunk)
        sink.write(text)
        sink.flush()
        pending += text
        *lines, pending = re.split(r"[\r\n]", pending)
        tail.extend(line for line in lines if line.strip())
    if pending.strip():
        tail.append(pending)


def failure_summary(lines: list[str]) -> str:
    """The failing rank's error from the launcher's last lines: its exception (with the traceback lines before it)
    and which rank processes exited with which code."""
    error_at = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
    parts = []
    if error_at:
        last = error_at[-1]
        start = max((i for i, line in enumerate(lines[: last + 1]) if "Traceback (most recent call last)" in line),
                    default=max(0, last - 1))
        parts.append("\n".join(lines[max(start, last - 12) : last + 1]))
    exits = [line.strip() for line in lines if RANK_EXIT.search(line)]
    if exits:
        parts.append("\n".join(exits[-4:]))
    return "\n".join(parts) or "\n".join(lines[-20:])


def run_launcher(command: list[str], output_dir: str | os.PathLike, *, cwd: Path, env: dict[str, str]) -> None:
    """Run ``command``, streaming its output; raise ``TrainingFailedError`` unless it leaves a finished model."""
    logger.info("Launching: %s", shlex.join(command))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    readers = [
        threading.Thread(target=_tee, args=(process.stdout, sys.stdout, tail), daemon=True),
        threading.Thread(target=_tee, args=(process.stderr, sys.stderr, tail), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        returncode = process.wait()
    except BaseException:  # an interrupted notebook cell stops the run too
        process.terminate()
        process.wait()
        raise
    for reader in readers:
        reader.join()
    if returncode != 0:
        raise TrainingFailedError(
            f"training failed (the launcher exited with code {returncode}). The failing rank reported:\n"
            f"{failure_summary(list(tail))}"
        )
    if not is_finished_output(output_dir):
        raise TrainingFailedError(f"the launcher exited 0 but {output_dir} holds no finished model")
    logger.info("Training finished: %s", output_dir)
