"""One run per output folder: the lock names its holder, and a dead holder's lock is free."""

import json
import os

import pytest

from training.rank.run_lock import LOCK_FILE_NAME, OutputDirLock, OutputDirLockedError, refuse_if_held_by_another_run


def test_a_second_lock_is_refused_with_the_holder_named_then_free_after_release(tmp_path):
    first = OutputDirLock(tmp_path / "out")
    first.acquire()
    with pytest.raises(
        OutputDirLockedError, match=rf"another run is writing to {tmp_path / 'out'} \(pid {os.getpid()} on "
    ):
        OutputDirLock(tmp_path / "out").acquire()
    first.release()
    assert not (tmp_path / "out" / LOCK_FILE_NAME).exists()
    with OutputDirLock(tmp_path / "out"):
        pass


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    import socket

    (tmp_path / LOCK_FILE_NAME).write_text(
        json.dumps({"pid": 2**22 + 1, "ppid": 1, "host": socket.gethostname(), "started": "", "command": ""})
    )
    with OutputDirLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE_NAME).read_text())
        assert holder["pid"] == os.getpid()


def test_other_ranks_refuse_a_live_holder_that_is_not_their_own_main_process(tmp_path):
    import socket

    holder = {
        "pid": os.getpid(),
        "ppid": os.getppid() + 1,
        "host": socket.gethostname(),
        "started": "t",
        "command": "c",
    }
    (tmp_path / LOCK_FILE_NAME).write_text(json.dumps(holder))
    with pytest.raises(OutputDirLockedError):
        refuse_if_held_by_another_run(tmp_path)
    holder["ppid"] = os.getppid()  # our own launcher's main process
    (tmp_path / LOCK_FILE_NAME).write_text(json.dumps(holder))
    refuse_if_held_by_another_run(tmp_path)


def test_ranks_on_another_node_know_their_own_main_process_by_the_rendezvous(tmp_path, monkeypatch):
    import socket

    # Another node's launcher is not our parent; the run's rendezvous address is what the ranks share.
    holder = {
        "pid": os.getpid(),
        "ppid": os.getppid() + 1,
        "host": socket.gethostname(),
        "started": "t",
        "command": "c",
        "rendezvous": "127.0.0.1:29611",
    }
    (tmp_path / LOCK_FILE_NAME).write_text(json.dumps(holder))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29611")
    refuse_if_held_by_another_run(tmp_path)
    monkeypatch.setenv("MASTER_PORT", "29612")  # another run's ranks
    with pytest.raises(OutputDirLockedError):
        refuse_if_held_by_another_run(tmp_path)
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(OutputDirLockedError):
        refuse_if_held_by_another_run(tmp_path)


HOLDER = """
import socket, sys, time
import fcntl

def no_flock(*args, **kwargs):  # as on a FUSE mount over object storage
    raise OSError(38, "flock is not supported on this filesystem")

fcntl.flock = no_flock
socket.gethostname = lambda: "node-a"
from training.rank.run_lock import OutputDirLock

OutputDirLock(sys.argv[1], launch_id="launch-a").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_two_launches_on_two_nodes_without_flock_the_second_is_refused_until_the_first_is_gone(
    tmp_path, monkeypatch, caplog
):
    """Launch A holds the run folder from "node-a" (a process of its own, flock failing as on a volume); launch B on
    "node-b" is refused, naming A, while A's heartbeat moves; once A is killed (its file stays), B watches the beat
    stand still and takes the folder over."""
    import fcntl
    import socket
    import subprocess
    import sys

    from helpers import PROJECT_ROOT, subprocess_env

    import training.rank.run_lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.5)
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    monkeypatch.setattr(fcntl, "flock", lambda *args: pytest.fail("the lock must not use flock"))
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        env=subprocess_env(DOLLY_LOCK_HEARTBEAT_S="0.5"),
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirLockedError, match=r"\(launch launch-a, pid \d+ on node-a, started "):
            OutputDirLock(out, launch_id="launch-b").acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_FILE_NAME).exists()  # a killed holder leaves its file
    with OutputDirLock(out, launch_id="launch-b"):
        assert json.loads((out / LOCK_FILE_NAME).read_text())["launch_id"] == "launch-b"
    assert "Taking over" in caplog.text and "its holder is gone (launch launch-a" in caplog.text
