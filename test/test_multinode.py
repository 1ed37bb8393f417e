"""Multi-node training on the loopback address: two "nodes" of one CPU rank each, under torchrun and under
DeepSpeed's launcher with ``--no_ssh`` (one launcher per node, as schedulers start them), give the weights of one
node with two ranks; a worker killed on one node ends the whole job, and ``--resume`` continues it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import NODES, node_logs, start_nodes, torchrun_node, wait_all, zero3_run_args
from safetensors.torch import load_file

from training.driver.launch import free_port
from training.rank.checkpoints import COMPLETE_MARKER

pytestmark = pytest.mark.launch

KILLED_JOB_ENDS_WITHIN_S = 120


def deepspeed_node(rank: int, port: int, args: list[str], hostfile: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "--module",
        "training.trainer",
        *args,
    ]


LAUNCHERS = ("torchrun", "deepspeed")


def node_commands(launcher: str, args: list[str], tmp_path: Path) -> list[list[str]]:
    port = free_port()
    if launcher == "torchrun":
        return [torchrun_node(rank, port, args) for rank in range(NODES)]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{rank} slots=1\n" for rank in range(NODES)))
    return [deepspeed_node(rank, port, args, hostfile) for rank in range(NODES)]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


@pytest.fixture(scope="module")
def one_node_two_ranks(zero3_run) -> dict:
    """The shared 1 node x 2 ranks run (conftest): every run here uses its arguments (``zero3_run_args``)."""
    return weights(zero3_run.out)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_nodes_give_the_weights_of_one_node(launcher, tiny_model_dir, sample_path, tmp_path, one_node_two_ranks):
    out = tmp_path / "out"
    nodes = start_nodes(
        node_commands(launcher, zero3_run_args(tiny_model_dir, sample_path, out), tmp_path), tmp_path / "logs"
    )
    codes = wait_all(nodes, timeout=600)
    assert codes == [0] * NODES, node_logs(tmp_path / "logs")
    assert max_difference(weights(out), one_node_two_ranks) <= 1e-5
    # Only global rank 0 wrote the output: one run lock holder, one published model.
    assert "Train data size: 33" in (tmp_path / "logs" / "node0.log").read_text()


def runs_module(process: psutil.Process, module: str) -> bool:
    """Whether ``process`` is ``python ... -m MODULE ...`` (its first ``-m``, so not a launcher passing it on)."""
    try:
        command = process.cmdline()
    except psutil.NoSuchProcess:
        return False
    return "-m" in command and command[command.index("-m") + 1 : command.index("-m") + 2] == [module]


def worker_of(node: subprocess.Popen) -> psutil.Process:
    """The training process a node's launcher started (its descendant running the trainer)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process(node.pid).children(recursive=True):
            if runs_module(child, "training.trainer"):
                return child
        time.sleep(0.1)
    raise AssertionError("no training process found under the node's launcher")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_killed_worker_ends_the_job_and_resume_continues_it(
    launcher, tiny_model_dir, sample_path, tmp_path, one_node_two_ranks
):
    out = tmp_path / "out"
    args = zero3_run_args(tiny_model_dir, sample_path, out)
    nodes = start_nodes(node_commands(launcher, args, tmp_path), tmp_path / "logs")
    victim = worker_of(nodes[1])
    checkpoint = out / "checkpoint-2" / COMPLETE_MARKER
    deadline = time.monotonic() + 600
    while not checkpoint.exists():
        assert all(node.poll() is None for node in nodes), node_logs(tmp_path / "logs")
        assert time.monotonic() < deadline, node_logs(tmp_path / "logs")
        time.sleep(0.2)
    victim.kill()
    killed_at = time.monotonic()
    codes = wait_all(nodes, timeout=KILLED_JOB_ENDS_WITHIN_S + 30)
    ended_after = time.monotonic() - killed_at
    print(f"{launcher}: every node's launcher exited {ended_after:.1f} s after the worker was killed ({codes})")
    assert all(code != 0 for code in codes), (codes, node_logs(tmp_path / "logs"))
    assert ended_after < KILLED_JOB_ENDS_WITHIN_S, ended_after
    assert not (out / "config.json").exists()  # no finished model from a broken job

    resumed = start_nodes(node_commands(launcher, args + ["--resume"], tmp_path), tmp_path / "resume-logs")
    assert wait_all(resumed, timeout=600) == [0] * NODES, node_logs(tmp_path / "resume-logs")
    assert f"Resuming from {out / 'checkpoint-2'}" in (tmp_path / "resume-logs" / "node0.log").read_text()
    assert max_difference(weights(out), one_node_two_ranks) <= 1e-5
