"""A launch plan: one training launch as values, the trainer's settings plus how and where its processes start.

The notebook builds one; the DeepSpeed launcher, torchrun and Spark paths (``training.driver.launch`` and
``training.driver.spark``) read it. Command-line flags are written only where a process is started, from these
values, never searched for or rewritten.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass

from ..settings import TrainSettings

LAUNCHERS = ("deepspeed", "torchrun", "spark")


def free_port() -> int:
    """A free TCP port on the loopback address, for a launcher's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class LaunchPlan:
    """What to launch (``settings``) and how: the launcher, processes per node, nodes, and the rendezvous port.

    Each plan is one launch, with an id of its own (``settings.launch_id``, given to every rank as ``--launch-id``):
    the stop file names the launch it stops (see ``training.rank.stopping``)."""

    settings: TrainSettings
    launcher: str = "deepspeed"  # deepspeed, torchrun (one node each), or spark (num_nodes Spark workers)
    processes_per_node: int | None = None  # None: one per GPU of the node (Spark: the cluster's GPUs per worker)
    num_nodes: int = 1
    master_port: int | None = None  # None: $MASTER_PORT if set, else a free port when the launch starts
    use_gpu: bool = True

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher '{self.launcher}'; choose one of {', '.join(LAUNCHERS)}")
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {self.num_nodes}")
        if self.num_nodes > 1 and self.launcher != "spark":
            raise ValueError(
                f"{self.num_nodes} nodes from one launch need Spark's workers (launcher 'spark'); for {self.launcher} "
                "start one launcher per node (README, Multi-node training)"
            )
        if self.processes_per_node is not None and self.processes_per_node < 1:
            raise ValueError(f"processes_per_node must be at least 1, got {self.processes_per_node}")
        if not self.use_gpu and self.processes_per_node is None and self.launcher != "spark":
            raise ValueError("without GPUs, say how many processes each node runs (processes_per_node)")
        if self.settings.launch_id is None:
            object.__setattr__(self, "settings", dataclasses.replace(self.settings, launch_id=uuid.uuid4().hex[:16]))

    @property
    def launch_id(self) -> str:
        return self.settings.launch_id

    def with_settings(self, **changes) -> LaunchPlan:
        """The same launch (its id kept) with settings changed."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, **changes))

    @property
    def output_dir(self) -> str:
        return self.settings.local_output_dir

    def rendezvous_port(self) -> int:
        """The port the ranks meet on: the plan's, else ``$MASTER_PORT``, else a free one (chosen per launch, so two
        runs on one machine never share DeepSpeed's default 29500)."""
        if self.master_port is not None:
            return self.master_port
        if os.environ.get("MASTER_PORT"):
            return int(os.environ["MASTER_PORT"])
        return free_port()
