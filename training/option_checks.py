"""Checking the trainer's options before anything starts: a bad value stops the run in one line naming the option.

These run in the CLI before a model is loaded or a process group is started, so a typo costs seconds, not a
queue slot on a GPU cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .prompts import format_training_text


def positive_float(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value is not None and not value > 0:
        raise click.BadParameter(f"must be above 0, got {value}")
    return value


def deepspeed_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The DeepSpeed config must exist and be a JSON object (DeepSpeed itself checks the keys)."""
    if value is None:
        return value
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"{value}: no such file")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise click.BadParameter(f"{value}: not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise click.BadParameter(f"{value}: expected a JSON object of DeepSpeed settings")
    return value


def template_length(tokenizer) -> int:
    """Tokens of the Dolly template around a one-word instruction and response: no record is shorter."""
    return len(tokenizer(format_training_text("x", "x"))["input_ids"])


def check_against_data(options: dict[str, Any]) -> None:
    """Options that only make sense against the data and the tokenizer: ``--test-size`` and ``--max-length``."""
    from .data import read_records
    from .modeling import load_tokenizer

    test_size = options["test_size"]
    if isinstance(test_size, int) and test_size > 0:
        records = len(read_records(options["training_dataset"]))
        if test_size >= records:
            raise click.BadParameter(
                f"{test_size} records held out leaves none to train on ({options['training_dataset']} has {records})",
                param_hint="'--test-size'",
            )
    max_length = options.get("max_length")
    if max_length is not None:
        tokenizer = load_tokenizer(options["input_model"], trust_remote_code=options.get("trust_remote_code", False))
        shortest = template_length(tokenizer)
        if max_length < shortest:
            raise click.BadParameter(
                f"{max_length} is below the {shortest} tokens of the Dolly template itself: every record would be "
                "removed",
                param_hint="'--max-length'",
            )
