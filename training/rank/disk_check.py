"""Checking, before any model is loaded, that a run's checkpoints and finished model fit in the output's free space.

A ZeRO-3 checkpoint of pythia-12b with its optimizer is close to 200 GB; a full disk should stop a run at its start,
not at its first checkpoint hours later. The estimate counts what the Trainer and DeepSpeed write (measured on this
project's checkpoints, see the README): per parameter, the optimizer's fp32 master weights and Adam moments (12
bytes) for every trained parameter, and the weights themselves at the precision they are saved in; a LoRA run under
DeepSpeed also saves the frozen base in the engine's model states. Parameters are counted on an empty (meta-device)
model built from the model's config, which needs no weights.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..settings import TrainSettings
from .checkpoints import list_checkpoints
from .elastic import ResumePoint

logger = logging.getLogger(__name__)

OPTIMIZER_BYTES = 12  # Adam: fp32 master weights, first and second moments (DeepSpeed keeps the master copy)
HF_OPTIMIZER_BYTES = 8  # Adam without DeepSpeed: the moments (the model's own weights are the fp32 copy)
# Beside the tensors: configs, trainer state, DeepSpeed's conversion scripts (about 64 KB), and per rank its RNG state
# (14 KB) and DeepSpeed's model-state metadata (about 500 bytes per parameter tensor). Measured on this project's
# checkpoints (README, "When the cluster changes under a run").
CHECKPOINT_FIXED_BYTES = 64 * 1024
PER_RANK_BYTES = 16 * 1024
PER_TENSOR_PER_RANK_BYTES = 512
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
HUB_TOKENIZER_BYTES = 5 * 2**20  # a hub model's tokenizer files, not known before download: a few MB
# The slowest write rate a checkpoint may meet: one stream through FUSE to object storage (a volume, DBFS).
SLOWEST_WRITE_BYTES_PER_S = 50 * 10**6
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800  # torch's own default


def human_size(size: float) -> str:
    """``2.80 MB``, ``166.00 GB``: bytes in decimal units, as disks are sold and ``df -H`` shows."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class DiskTooSmallError(RuntimeError):
    """The run's checkpoints and finished model cannot fit in the output's free space."""


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int
    tensors: int


@dataclass(frozen=True)
class DiskEstimate:
    checkpoint_bytes: int
    checkpoints_at_once: int
    final_model_bytes: int
    free_bytes: int
    folder: Path
    mlflow_model_bytes: int = 0  # the MLflow model's copy of the finished model (a local artifact store, or staging)

    @property
    def needed_bytes(self) -> int:
        return self.checkpoint_bytes * self.checkpoints_at_once + self.final_model_bytes + self.mlflow_model_bytes

    def describe(self) -> str:
        mlflow = f", its MLflow copy of about {human_size(self.mlflow_model_bytes)}" if self.mlflow_model_bytes else ""
        return (
            f"{self.checkpoints_at_once} checkpoint(s) of about {human_size(self.checkpoint_bytes)} at once and the "
            f"finished model of about {human_size(self.final_model_bytes)}{mlflow}; {human_size(self.free_bytes)} free "
            f"on the filesystem of {self.folder}"
        )


def weight_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def lora_parameter_count(model, settings: TrainSettings) -> int:
    """LoRA's trainable parameters: r x (in + out) per adapted linear layer, and the new tokens' rows."""
    import torch

    from .lora import default_target_modules

    targets = settings.lora_target_modules or default_target_modules(model)
    adapted = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith(("lm_head", "embed_out")):
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            adapted += settings.lora_r * (module.in_features + module.out_features)
    hidden = model.get_input_embeddings().embedding_dim
    return adapted + 3 * hidden * 2  # Dolly's three tokens, input and output rows


@functools.lru_cache(maxsize=2)
def parameter_counts(settings: TrainSettings) -> ParameterCounts:
    """The model's parameters (and those a LoRA run trains), from its config alone."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import set_zero3_state

    config = AutoConfig.from_pretrained(settings.input_model, trust_remote_code=settings.trust_remote_code)
    # set_zero3_state: an empty model, not one ZeRO-3 partitions (the run's DeepSpeed config is active by now).
    with init_empty_weights(), set_zero3_state():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    model.tie_weights()  # as loading does: tied embeddings are one tensor (SmolLM2, Llama-style models)
    parameters = list(model.parameters())
    total = sum(parameter.numel() for parameter in parameters)
    trainable = lora_parameter_count(model, settings) if settings.lora_r > 0 else total
    return ParameterCounts(total, trainable, len(parameters))


def tokenizer_bytes(input_model: str) -> int:
    """The tokenizer files every checkpoint and the finished model carry (a local model's, else a few MB)."""
    folder = Path(input_model)
    if not folder.is_dir():
        return HUB_TOKENIZER_BYTES
    return sum((folder / name).stat().st_size for name in TOKENIZER_FILES if (folder / name).is_file())


def checkpoint_bytes(counts: ParameterCounts, settings: TrainSettings, precision: str, world_size: int) -> int:
    """Bytes of one checkpoint, as the Trainer and DeepSpeed write it."""
    weights = weight_bytes(precision)
    fixed = (
        tokenizer_bytes(settings.input_model)
        + CHECKPOINT_FIXED_BYTES
        + world_size * (PER_RANK_BYTES + PER_TENSOR_PER_RANK_BYTES * counts.tensors)
    )
    if settings.lora_r > 0:
        adapter = counts.trainable * (weights + (OPTIMIZER_BYTES if settings.deepspeed else HF_OPTIMIZER_BYTES))
        # Under DeepSpeed the engine's model states hold the whole (frozen) module too.
        return adapter + (counts.total * weights if settings.deepspeed else 0) + fixed
    if settings.deepspeed:
        return counts.total * (OPTIMIZER_BYTES + weights) + fixed
    return counts.total * (4 + HF_OPTIMIZER_BYTES) + fixed  # fp32 weights and Adam's moments


def final_model_bytes(counts: ParameterCounts, settings: TrainSettings, precision: str) -> int:
    weights = weight_bytes(precision)
    model = counts.total * weights if (settings.lora_r == 0 or settings.merge_lora) else 0
    adapter = counts.trainable * weights if settings.lora_r > 0 else 0
    return model + adapter + tokenizer_bytes(settings.input_model) + CHECKPOINT_FIXED_BYTES


def collective_timeout_s(settings: TrainSettings, precision: str, world_size: int) -> int:
    """How long a rank may wait at a collective: ``--collective-timeout``, else from the work the longest wait covers.

    At a checkpoint the main process writes the gathered 16-bit model and its own part of the checkpoint while the
    other ranks wait at the next collective; at the slowest storage rate (:data:`SLOWEST_WRITE_BYTES_PER_S`), twice
    over, and never below torch's 30 minutes. (The finished model's publish waits through a hand-off instead.)"""
    if settings.collective_timeout:
        return int(settings.collective_timeout)
    counts = parameter_counts(settings)
    written = final_model_bytes(counts, settings, precision) + checkpoint_bytes(
        counts, settings, precision, world_size
    ) / max(1, world_size)
    return max(DEFAULT_COLLECTIVE_TIMEOUT_S, int(2 * written / SLOWEST_WRITE_BYTES_PER_S))


def planned_steps(settings: TrainSettings, train_records: int, world_size: int) -> int:
    if settings.max_steps > 0:
        return settings.max_steps
    per_step = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * world_size
    return math.ceil(math.ceil(train_records / per_step) * settings.epochs)


def checkpoints_at_once(settings: TrainSettings, steps: int, existing: int) -> int:
    """The most new checkpoints on disk at one time: the kept ones and, while rotating, one more."""
    saves = steps // settings.save_steps + (1 if steps % settings.save_steps else 0)
    if settings.save_total_limit and settings.save_total_limit > 0:
        return max(0, min(saves, settings.save_total_limit + 1 - existing))
    return saves


def nearest_existing(folder: Path) -> Path:
    while not folder.exists():
        folder = folder.parent
    return folder


def estimate_disk(
    settings: TrainSettings, *, train_records: int, world_size: int, precision: str, universal: bool = False
) -> DiskEstimate:
    """The space a run will need and the space there is. ``universal``: the resume converts a checkpoint to
    DeepSpeed's universal form first (about one more checkpoint)."""
    counts = parameter_counts(settings)
    output = Path(settings.local_output_dir)
    existing = len(list_checkpoints(output)) if settings.resume else 0
    per_checkpoint = checkpoint_bytes(counts, settings, precision, world_size)
    return DiskEstimate(
        checkpoint_bytes=per_checkpoint,
        checkpoints_at_once=checkpoints_at_once(settings, planned_steps(settings, train_records, world_size), existing)
        + (1 if universal else 0),
        final_model_bytes=(final := final_model_bytes(counts, settings, precision)),
        mlflow_model_bytes=final if settings.mlflow else 0,
        free_bytes=shutil.disk_usage(nearest_existing(output)).free,
        folder=nearest_existing(output),
    )


def check_disk(
    settings: TrainSettings, *, train_records: int, world_size: int, precision: str, universal: bool = False
) -> DiskEstimate:
    """Refuse a run that cannot fit (``DiskTooSmallError`` naming the figures and the settings to change)."""
    estimate = estimate_disk(
        settings, train_records=train_records, world_size=world_size, precision=precision, universal=universal
    )
    logger.info("Disk: %s", estimate.describe())
    if estimate.needed_bytes > estimate.free_bytes:
        raise DiskTooSmallError(
            f"this run needs about {human_size(estimate.needed_bytes)} in {settings.local_output_dir} "
            f"({estimate.describe()}). Free space, lower --save-total-limit (now {settings.save_total_limit}) or raise "
            f"--save-steps (now {settings.save_steps}), choose another --local-output-dir, or skip this check with "
            "--no-disk-check"
        )
    return estimate


def check_disk_for(
    settings: TrainSettings, resume: ResumePoint | None, world_size: int, *, train_records: int
) -> DiskEstimate:
    """:func:`check_disk` for a run about to start (or resume from ``resume``) on ``world_size`` ranks."""
    from .modeling import choose_precision

    return check_disk(
        settings,
        train_records=train_records,
        world_size=world_size,
        precision=choose_precision(settings.bf16),
        universal=bool(resume and resume.universal),
    )
