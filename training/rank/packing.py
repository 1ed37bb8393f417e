"""Packed training, in one place: what a packed step changes, and switching it on and off.

A packed step differs from Dolly's padded step in four ways, all made here:

1. **Rows.** The micro-batch's records are concatenated into one row with no padding; position ids restart at
   each record, and each record's first label is -100, so nothing is learned across a boundary
   (:class:`DataCollatorForPackedCompletionOnlyLM`). The collator also says where each record lies, once per
   batch: ``record_bounds`` as plain integers (no device-to-host copy is needed to read them) and, for
   FlashAttention's varlen kernel, ``cu_seq_lens_q``/``cu_seq_lens_k`` with ``max_length_q``/``max_length_k``.
2. **Attention.** Each record attends only to itself, through one varlen kernel call per layer on a GPU (FlashAttention's,
   or PyTorch's ``varlen_attn``) and causal SDPA per record on a CPU, from the collator's bounds: chosen once per run
   and switched on for training only (:mod:`training.rank.packed_attention`); no mask is built for a packed row. A
   model whose attention those kernels cannot serve exactly keeps its own, with the block-diagonal mask transformers
   builds from the restarting positions. Saved models, and generation during training, use the model's own attention.
3. **Output layer.** The batch carries ``logits_to_keep`` (the positions that predict a response token) and
   ``shift_labels`` (their targets), so the vocabulary projection and the loss skip prompt tokens. ``labels``
   stay in the batch, for the Trainer to count response tokens.
4. **Normalisation.** The Trainer divides the summed loss by the response tokens of the whole optimizer step
   (``num_items_in_batch``), so a step's update is the same however records are grouped into rows, micro-batches
   and accumulation steps (``test/test_packing.py``).

Models that cannot take packed rows (no ``position_ids``, or an attention that ignores them) get Dolly's padded
batches, grouped by length.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..preprocess import IGNORE_INDEX
from ..settings import SettingsError
from .collators import DataCollatorForCompletionOnlyLM, labels_for
from .distributed import every_rank, is_main_process
from .packed_attention import (
    MODEL_ATTENTION,
    PACKED_ATTENTION,
    KernelChoice,
    choose_kernel_for,
    register_packed_attention,
)
from .packing_check import PackingCheck, check_packing

logger = logging.getLogger(__name__)

# Attention implementations that read packed sequences from restarting position ids.
PACKING_ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", PACKED_ATTENTION}
# Those the packed-row kernels replace while training (same arithmetic; others keep their own attention).
REPLACEABLE_ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3"}


# ---- 1 and 3: the packed batch ----


@dataclass
class DataCollatorForPackedCompletionOnlyLM:
    """Packs a batch into one row with no padding: position ids restart at each record.

    With ``response_logits_only``, the batch asks the model for vocabulary logits only where a response token is
    predicted (``logits_to_keep``), and the loss reads the matching targets from ``shift_labels``.
    """

    tokenizer: PreTrainedTokenizerBase
    response_logits_only: bool = True
    return_tensors: str = "pt"

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for example in examples:
            record_labels = labels_for(example, self.tokenizer)
            record_labels[0] = IGNORE_INDEX
            input_ids.extend(example["input_ids"])
            labels.extend(record_labels)
            position_ids.extend(range(len(example["input_ids"])))
        lengths = [len(example["input_ids"]) for example in examples]
        edges = list(itertools.accumulate(lengths, initial=0))
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "use_cache": False,
            "record_bounds": tuple(zip(edges[:-1], edges[1:])),
            "cu_seq_lens_q": torch.tensor(edges, dtype=torch.int32),
            "cu_seq_lens_k": torch.tensor(edges, dtype=torch.int32),
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
        }
        if self.response_logits_only:
            targets = batch["labels"][0, 1:]
            predicting = torch.nonzero(targets != IGNORE_INDEX).flatten()
            batch["logits_to_keep"] = predicting
            batch["shift_labels"] = targets[predicting].unsqueeze(0)
        return batch


# ---- 2: attention per record (the kernels: training/rank/packed_attention.py) ----


def record_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each record in a packed row, from where its position ids restart (reads the tensor on the
    host: for checking and for batches made elsewhere; the collator hands its bounds down instead)."""
    positions = position_ids.flatten()
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    edges = [0] + starts.tolist() + [positions.numel()]
    return list(zip(edges[:-1], edges[1:]))


# ---- deciding, and switching on and off ----


def unwrap(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_packing(model: PreTrainedModel) -> bool:
    """Whether the model can train on packed rows: it takes position ids and its attention honours them."""
    model = unwrap(model)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    return takes_positions and getattr(model.config, "_attn_implementation", None) in PACKING_ATTENTION


def default_device() -> torch.device:
    """Where the Trainer puts the model when nothing says otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def packing_collator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device | str | None = None,
    precision: str | None = None,
) -> DataCollatorForPackedCompletionOnlyLM | None:
    """The packed collator, with the model's attention switched to the packed-row kernel chosen for ``device`` and
    ``precision`` (:func:`training.rank.packed_attention.choose_kernel`); None if the model cannot pack. Without
    ``precision``, the model's own dtype says it (a run whose engine casts the model later must say it).

    Pair with :func:`restore_attention` (or use :func:`packed_batches`, which does both).
    """
    if not supports_packing(model):
        return None
    base = unwrap(model)
    own = base.config._attn_implementation
    if own == PACKED_ATTENTION:
        own = getattr(base, "_dolly_own_attention", "sdpa")
    precision = precision or {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(base.dtype, "fp32")
    choice = choose_kernel_for(base, device or default_device(), precision)
    if own not in REPLACEABLE_ATTENTION:
        choice = KernelChoice(MODEL_ATTENTION, f"the model uses {own}")
    base._dolly_own_attention = own
    if choice.replaces_attention:
        base.set_attn_implementation(register_packed_attention(choice))
        if base.config._attn_implementation != PACKED_ATTENTION:  # some models (Falcon) keep theirs, with a warning
            choice = KernelChoice(MODEL_ATTENTION, f"{type(base).__name__} cannot switch its attention ({own} kept)")
    base._dolly_packed_kernel = choice
    return DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer)


def packed_kernel(model: PreTrainedModel) -> KernelChoice | None:
    """The kernel :func:`packing_collator` chose for this model (None before it ran)."""
    return getattr(unwrap(model), "_dolly_packed_kernel", None)


def restore_attention(model: PreTrainedModel) -> None:
    """The model's own attention again: the packed-row attention is a training-time choice (saved models, and
    generation with a cache or padding, use the model's own)."""
    base = unwrap(model)
    if base.config._attn_implementation == PACKED_ATTENTION:
        base.set_attn_implementation(getattr(base, "_dolly_own_attention", "sdpa"))


@contextmanager
def plain_attention(model: PreTrainedModel) -> Iterator[None]:
    """The model's own attention inside the block (generation during training, the self-check's records alone),
    the packed-row attention again after it."""
    base = unwrap(model)
    packed = base.config._attn_implementation == PACKED_ATTENTION
    if packed:
        base.set_attn_implementation(getattr(base, "_dolly_own_attention", "sdpa"))
    try:
        yield
    finally:
        if packed:
            base.set_attn_implementation(PACKED_ATTENTION)


@dataclass(frozen=True)
class Batching:
    """How the Trainer batches records: the collator, whether to group records of similar length, and the attention
    packed rows run through (None for padded batches)."""

    collator: Any
    group_by_length: bool = False
    attention: KernelChoice | None = None


class PackingRefused(SettingsError):
    """``--packing`` was asked for, but this model's records would not stay apart in a packed row."""


def choose_collator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    packing: bool | None,
    check_with: list[dict[str, Any]] | None = None,
    precision: str = "fp32",
    device: torch.device | str | None = None,
) -> DataCollatorForPackedCompletionOnlyLM | None:
    """The packed collator, if this run packs: ``packing`` None packs where the model supports it and passes the
    self-check on ``check_with`` (some of the run's records), True insists (and refuses otherwise), False never.
    The self-check runs the packed row through the kernel training will use, and each record alone through the
    model's own attention."""
    if packing is False:
        return None
    collator = packing_collator(model, tokenizer, device=device, precision=precision)
    if collator is None:
        if packing:
            raise PackingRefused(
                "--packing: this model cannot train on packed rows (it takes no position ids, or its attention ignores "
                "them); run with --no-packing"
            )
        logger.warning("This model cannot train on packed rows; grouping records of similar length instead")
        return None
    if not check_with:
        return collator
    every_logit = DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer, response_logits_only=False)

    def check() -> tuple[PackingCheck, bool]:
        result = check_packing(model, check_with, precision, pack=every_logit, alone=lambda: plain_attention(model))
        # One verdict for the run: ranks that batched differently would no longer run matching collectives.
        return result, every_rank(result.passed, next(model.parameters()).device)

    result, passed_everywhere = check()
    if not passed_everywhere and packed_kernel(model).replaces_attention:
        # Some models' layers do not hand the batch's record bounds down to attention (StableLM): the kernel then
        # sees one record. Their own attention, with the mask transformers builds from the positions, is exact.
        kernel = packed_kernel(model)
        restore_attention(model)
        unwrap(model)._dolly_packed_kernel = KernelChoice(
            MODEL_ATTENTION, f"{kernel.kernel} failed the packing self-check on this model ({result.describe()})"
        )
        result, passed_everywhere = check()
    if passed_everywhere:
        logger.info("Packing self-check passed: %s", result.describe())
        return collator
    restore_attention(model)
    where = result.describe() if not result.passed else "on another rank; here: " + result.describe()
    if packing:
        raise PackingRefused(
            f"--packing: the packing self-check failed on this model ({where}): records in a packed row "
            "would see each other; run with --no-packing"
        )
    if is_main_process():  # the same verdict on every rank: said once
        logger.warning(
            "Packing self-check failed (%s): records in a packed row would see each other, so every rank trains on "
            "padded batches (--packing would refuse; --no-packing skips the check)",
            where,
        )
    return None


@contextmanager
def packed_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    packing: bool | None,
    check_with: list[dict[str, Any]] | None = None,
    precision: str = "fp32",
    device: torch.device | str | None = None,
) -> Iterator[Batching]:
    """The batching for a training run (:func:`choose_collator`), with the model's attention switched to the packed-row
    kernel inside the block where it packs, and back on leaving it (also when training fails)."""
    collator = choose_collator(
        model, tokenizer, packing=packing, check_with=check_with, precision=precision, device=device
    )
    if collator is None:
        batching = Batching(
            DataCollatorForCompletionOnlyLM(tokenizer=tokenizer, pad_to_multiple_of=8),
            group_by_length=packing is not False,
        )
    else:
        batching = Batching(collator, attention=packed_kernel(model))
        if is_main_process():
            logger.info("Packed rows attend through %s", batching.attention.describe())
    logger.info("Batching with %s", type(batching.collator).__name__)
    try:
        yield batching
    finally:
        restore_attention(model)
