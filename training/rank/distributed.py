"""Process-group set-up and tear-down: DeepSpeed's CPU ranks made visible to accelerate, and a clean exit.

Making the DeepSpeed launcher's ranks visible to accelerate when there is no GPU:

accelerate only knows GPU backends for DeepSpeed; on the DeepSpeed CPU accelerator it would see one process, so
every rank would read the same batches and evaluation's gathers would fail. Configuring its state with gloo first,
and telling the Trainer to use that state, gives true data parallelism on CPU. On GPUs nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch


def launched_by_deepspeed_on_cpu(deepspeed_config: str | None) -> bool:
    """A DeepSpeed-launched rank (LOCAL_RANK set) with a DeepSpeed config and no CUDA device."""
    return bool(deepspeed_config) and not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1


def accelerator_config_for(deepspeed_config: str | None, timeout_s: float | None = None) -> dict | None:
    """The ``accelerator_config`` for ``TrainingArguments``: a pre-configured gloo state on CPU; on a GPU, batches
    copied to the device without the host waiting for it (the data loader pins them); else the default."""
    if not launched_by_deepspeed_on_cpu(deepspeed_config):
        return {"non_blocking": True} if torch.cuda.is_available() else None
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"use_configured_state": True}


def global_rank() -> int:
    """This process's global rank: the process group's once it has started, else the launcher's ``RANK`` (a lone
    process is rank 0)."""
    if is_distributed():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many ranks this run has (the launcher's ``WORLD_SIZE`` before the process group starts)."""
    if is_distributed():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is global rank 0, the one that holds the run's lock and writes its output and logs.

    The one answer to that question in the project: before the process group starts it reads the launcher's
    environment, afterwards the group itself (they agree).
    """
    return global_rank() == 0


def is_distributed() -> bool:
    """Whether this process is in a started process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a lone process)."""
    if is_distributed():
        torch.distributed.barrier()


def every_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on every rank (collective: every rank calls it; a lone process answers its own)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


SHM_SEGMENT_FOLDER = Path("/dev/shm")


def shared_memory_segment(rank: int | None = None) -> Path | None:
    """The ``/dev/shm`` segment DeepSpeed's CPU all-reduce created for a rank (None without a launcher's address)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None:
        return None
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return SHM_SEGMENT_FOLDER / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def forget_shared_memory_segment() -> None:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped every segment.

    DeepSpeed's CPU all-reduce (``ops/csrc/cpu/comm/shm.cpp``) gives each rank of a single-node run a ~70 MB
    ``/dev/shm`` segment and never unlinks it, so every CPU run left world-size x 70 MB of RAM behind until reboot
    (19 GB on the development machine after a day of tests, until runs slowed to a crawl). The segments are mapped
    while the process group starts; after a barrier, unlinking the names changes nothing for the running ranks,
    and the kernel frees the memory when the last of them exits, killed or not. Collective: call on every rank.
    """
    if not is_distributed():
        return
    torch.distributed.barrier()
    segment = shared_memory_segment()
    if segment is not None:
        segment.unlink(missing_ok=True)


def leave_process_group() -> bool:
    """Destroy the default process group (and with it every group) if one was started; say whether one was."""
    if not is_distributed():
        return False
    torch.distributed.destroy_process_group()
    return True


def end_process(code: int) -> NoReturn:
    """Flush and close logs and output, then ``os._exit(code)`` (see :func:`exit_after_success` for why not a normal
    exit)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream has nothing left to flush
            stream.flush()
    os._exit(code)


def exit_after_success() -> NoReturn:
    """End a distributed rank that finished its work (or stopped on request): ``end_process(0)``.

    Why not a normal interpreter exit: DeepSpeed's ZeRO-3 keeps the model's parameters reachable from module-level
    state (``parameter_offload.FWD_MODULE_STACK`` and a class-level ``lru_cache`` of the partitioned-parameter
    coordinator), and every parameter holds its process group. So the gloo groups, their native threads (a tcp
    loop and work threads per group) and, on rank 0, the TCPStore's libuv thread outlive
    ``destroy_process_group()`` and are torn down during interpreter finalization, in an order nothing controls;
    a rank then intermittently died with "terminate called without an active exception" (SIGABRT) after its work
    was saved. Only reached after a run that returned normally: a failing run raises and keeps its exit code.
    """
    end_process(0)
