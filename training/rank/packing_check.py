"""The packing self-check: on the user's own model and records, packed rows must give each record what it gets alone.

Packing is chosen by model type and attention implementation, but only the model itself can say whether records in
one row stay apart (an attention that ignores the restarting positions, or a layer that mixes neighbouring tokens,
lets them see each other and quietly worsens training). Before training, a few of the run's own records go through
the model twice, forward only: packed into one row as training packs them, and each alone. If their outputs differ
beyond the tolerance for the precision, packing is off for this run (or, when it was asked for explicitly, the run
refuses). Under ZeRO-3 the weights are partitioned and the engine does not exist yet, so each module's weights are
gathered for its own forward and released after it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled

logger = logging.getLogger(__name__)

CHECK_RECORDS = 3
CANDIDATES = 32  # the check takes the shortest of the first few training records: cheap, and as telling
# Largest difference allowed, as a share of the largest logit: kernels that sum in another order differ by a little
# (fp32: about 1e-6 here), records that see each other by a lot (the leaky test model: about 1e-1).
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}


@dataclass(frozen=True)
class PackingCheck:
    difference: float  # largest absolute difference of any logit, packed against alone
    scale: float  # the largest absolute logit
    tolerance: float  # share of ``scale`` allowed
    records: int
    seconds: float

    @property
    def passed(self) -> bool:
        return self.difference <= self.tolerance * self.scale

    def describe(self) -> str:
        return (
            f"{self.records} records packed into one row against each alone: largest logit difference "
            f"{self.difference:.3g} (logits up to {self.scale:.3g}; allowed: {self.tolerance:g} of that), "
            f"{self.seconds:.1f} s"
        )


@contextlib.contextmanager
def gathered_weights(model: torch.nn.Module) -> Iterator[None]:
    """Under ZeRO-3 (outside DeepSpeed's engine), each module's partitioned weights gathered for its forward and
    released after it (one module's weights at a time); otherwise nothing to do. Collective: every rank must run
    the same forward passes."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    gathered: dict[int, Any] = {}

    def gather(module, args):
        own = list(module.parameters(recurse=False))
        if own:
            gathered[id(module)] = deepspeed.zero.GatheredParameters(own, modifier_rank=None)
            gathered[id(module)].__enter__()

    def release(module, args, output):
        context = gathered.pop(id(module), None)
        if context is not None:
            context.__exit__(None, None, None)

    handles = []
    for module in model.modules():
        handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_records(train_dataset) -> list[dict[str, Any]]:
    """The records the check uses: the shortest few among the first training records."""
    first = [train_dataset[i] for i in range(min(CANDIDATES, len(train_dataset)))]
    return sorted(first, key=lambda record: len(record["input_ids"]))[:CHECK_RECORDS]


@torch.no_grad()
def check_packing(
    model: PreTrainedModel,
    records: list[dict[str, Any]],
    precision: str,
    *,
    pack: Callable[[list[dict[str, Any]]], dict[str, Any]],
    alone: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> PackingCheck:
    """Run ``records`` through ``model`` packed by ``pack`` (the training collator, asked for every position's
    logits) and each alone inside ``alone()`` (training: the model's own attention), and compare."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    packed = pack(records)
    inputs = {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in packed.items()
        if key != "labels"
    }
    was_training = model.training
    model.eval()
    difference = scale = 0.0
    try:
        with gathered_weights(model):
            packed_logits = model(**inputs).logits[0].float()
            for (start, end), record in zip(packed["record_bounds"], records):
                with alone():
                    by_itself = model(input_ids=torch.tensor([record["input_ids"]], device=device), use_cache=False)
                alone_logits = by_itself.logits[0].float()
                difference = max(difference, (packed_logits[start:end] - alone_logits).abs().max().item())
                scale = max(scale, alone_logits.abs().max().item())
    finally:
        model.train(was_training)
    return PackingCheck(
        difference, scale, TOLERANCE.get(precision, TOLERANCE["fp32"]), len(records), time.perf_counter() - started
    )
