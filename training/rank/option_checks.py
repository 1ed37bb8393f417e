"""Checking the trainer's options against the data and the tokenizer before anything starts.

Each option's own checks live with its field in ``training.settings``; this one needs the tokenizer. They
run in the CLI before a model is loaded or a process group is started, so a typo costs seconds, not a queue slot
on a GPU cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..saved_model.prompts import format_training_text

if TYPE_CHECKING:
    from ..settings import TrainSettings


def template_length(tokenizer) -> int:
    """Tokens of the Dolly template around a one-word instruction and response: no record is shorter."""
    return len(tokenizer(format_training_text("x", "x"))["input_ids"])


def check_max_length(settings: TrainSettings) -> None:
    """``--max-length`` against the tokenizer: it must hold at least the Dolly template. (``--test-size`` is checked
    against the data once it is prepared, in ``training.rank.training_data``: the data is read once per run.)"""
    from .modeling import load_tokenizer

    max_length = settings.max_length
    if max_length is not None:
        tokenizer = load_tokenizer(settings.input_model, trust_remote_code=settings.trust_remote_code)
        shortest = template_length(tokenizer)
        if max_length < shortest:
            raise click.BadParameter(
                f"{max_length} is below the {shortest} tokens of the Dolly template itself: every record would be "
                "removed",
                param_hint="'--max-length'",
            )
