"""Making the DeepSpeed launcher's ranks visible to accelerate when there is no GPU.

accelerate only knows GPU backends for DeepSpeed; on the DeepSpeed CPU accelerator it would see one process, so
every rank would read the same batches and evaluation's gathers would fail. Configuring its state with gloo first,
and telling the Trainer to use that state, gives true data parallelism on CPU. On GPUs nothing changes.
"""

from __future__ import annotations

import os

import torch


def launched_by_deepspeed_on_cpu(deepspeed_config: str | None) -> bool:
    """A DeepSpeed-launched rank (LOCAL_RANK set) with a DeepSpeed config and no CUDA device."""
    return bool(deepspeed_config) and not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1


def accelerator_config_for(deepspeed_config: str | None) -> dict | None:
    """The ``accelerator_config`` for ``TrainingArguments``: a pre-configured gloo state on CPU, else the default."""
    if not launched_by_deepspeed_on_cpu(deepspeed_config):
        return None
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"use_configured_state": True}
