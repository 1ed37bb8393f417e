"""Checking the trainer's options against the data and the tokenizer before anything starts.

Each option's own checks live with its field in ``training.settings``; these need the data or the tokenizer. They
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


def check_against_data(settings: TrainSettings) -> None:
    """Options that only make sense against the data and the tokenizer: ``--test-size`` and ``--max-length``."""
    from ..data import read_records
    from .modeling import load_tokenizer

    test_size = settings.test_size
    if isinstance(test_size, int) and test_size > 0:
        records = len(read_records(settings.training_dataset, settings.columns))
        if test_size >= records:
            raise click.BadParameter(
                f"{test_size} records held out leaves none to train on ({settings.training_dataset} has {records})",
                param_hint="'--test-size'",
            )
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
