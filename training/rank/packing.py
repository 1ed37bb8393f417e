"""Packed training, in one place: what a packed step changes, and switching it on and off.

A packed step differs from Dolly's padded step in four ways, all made here:

1. **Rows.** The micro-batch's records are concatenated into one row with no padding; position ids restart at
   each record, and each record's first label is -100, so nothing is learned across a boundary
   (:class:`DataCollatorForPackedCompletionOnlyLM`). The collator also says where each record lies, once per
   batch: ``record_bounds`` as plain integers (no device-to-host copy is needed to read them) and, for
   FlashAttention's varlen kernel, ``cu_seq_lens_q``/``cu_seq_lens_k`` with ``max_length_q``/``max_length_k``.
2. **Attention.** Without an attention mask (and with ``use_cache=False``, since a KV cache would hide the
   packing), transformers builds a block-diagonal causal mask from the restarting positions. Where the model uses
   SDPA, :func:`packed_batches` switches it, for the duration of training only, to :func:`packed_sdpa_attention`,
   which runs causal SDPA per record, from the collator's bounds, instead of computing and discarding every
   cross-record score; a saved model uses plain SDPA again. FlashAttention 2/3 (chosen when it is installed on a
   GPU, see ``training.modeling``) takes the ``cu_seq_lens`` and runs its varlen kernel.
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
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..preprocess import IGNORE_INDEX
from ..settings import SettingsError
from .collators import DataCollatorForCompletionOnlyLM, labels_for
from .distributed import every_rank, is_main_process
from .packing_check import check_packing

logger = logging.getLogger(__name__)

PACKED_SDPA = "dolly_packed_sdpa"
# Attention implementations that read packed sequences from restarting position ids.
PACKING_ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", PACKED_SDPA}


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


# ---- 2: attention per record ----


def record_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each record in a packed row, from where its position ids restart (reads the tensor on the
    host: for checking and for batches made elsewhere; the collator hands its bounds down instead)."""
    positions = position_ids.flatten()
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    edges = [0] + starts.tolist() + [positions.numel()]
    return list(zip(edges[:-1], edges[1:]))


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    record_bounds: tuple[tuple[int, int], ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA per record for one packed row (query/key/value: batch, heads, tokens, head_dim), from the
    collator's ``record_bounds``: plain integers, so no layer waits on the device to learn where records are.

    Anything else (padded batches, generation with a cache, a row without bounds) goes to the ordinary SDPA function
    with its mask, unchanged; the mask transformers builds from restarting position ids keeps records apart there.
    """
    packed_row = (
        record_bounds is not None
        and len(record_bounds) > 1
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == record_bounds[-1][1]
    )
    if not packed_row:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_ids=position_ids,
            **kwargs,
        )
    grouped = key.shape[1] != query.shape[1]
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=grouped,
        )
        for start, end in record_bounds
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> str:
    """Make the function available as an attention implementation (masks built as for SDPA); returns its name."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


# ---- deciding, and switching on and off ----


def unwrap(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_packing(model: PreTrainedModel) -> bool:
    """Whether the model can train on packed rows: it takes position ids and its attention honours them."""
    model = unwrap(model)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    return takes_positions and getattr(model.config, "_attn_implementation", None) in PACKING_ATTENTION


def packing_collator(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> DataCollatorForPackedCompletionOnlyLM | None:
    """The packed collator, with per-record attention switched on where the model uses SDPA; None if unsupported.

    Pair with :func:`restore_attention` (or use :func:`packed_batches`, which does both).
    """
    if not supports_packing(model):
        return None
    if unwrap(model).config._attn_implementation == "sdpa":
        unwrap(model).set_attn_implementation(register_packed_sdpa())
    return DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer)


def restore_attention(model: PreTrainedModel) -> None:
    """Saved models use plain SDPA: the packed-row attention is a training-time choice."""
    base = unwrap(model)
    if base.config._attn_implementation == PACKED_SDPA:
        base.set_attn_implementation("sdpa")


@dataclass(frozen=True)
class Batching:
    """How the Trainer batches records: the collator, and whether to group records of similar length."""

    collator: Any
    group_by_length: bool = False


class PackingRefused(SettingsError):
    """``--packing`` was asked for, but this model's records would not stay apart in a packed row."""


def choose_collator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    packing: bool | None,
    check_with: list[dict[str, Any]] | None = None,
    precision: str = "fp32",
) -> DataCollatorForPackedCompletionOnlyLM | None:
    """The packed collator, if this run packs: ``packing`` None packs where the model supports it and passes the
    self-check on ``check_with`` (some of the run's records), True insists (and refuses otherwise), False never."""
    if packing is False:
        return None
    collator = packing_collator(model, tokenizer)
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
    result = check_packing(model, check_with, precision, pack=every_logit)
    # One verdict for the run: ranks that batched differently would no longer run matching collectives.
    passed_everywhere = every_rank(result.passed, next(model.parameters()).device)
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
) -> Iterator[Batching]:
    """The batching for a training run (:func:`choose_collator`), with the model's attention switched to per-record
    SDPA inside the block where it packs, and back on leaving it (also when training fails)."""
    collator = choose_collator(model, tokenizer, packing=packing, check_with=check_with, precision=precision)
    if collator is None:
        batching = Batching(
            DataCollatorForCompletionOnlyLM(tokenizer=tokenizer, pad_to_multiple_of=8),
            group_by_length=packing is not False,
        )
    else:
        batching = Batching(collator)
    logger.info("Batching with %s", type(batching.collator).__name__)
    try:
        yield batching
    finally:
        restore_attention(model)
