"""Rendering records and instructions with Dolly's templates."""

from __future__ import annotations

from .consts import (
    PROMPT_FOR_GENERATION_FORMAT,
    PROMPT_NO_INPUT_FORMAT,
    PROMPT_WITH_INPUT_FOR_GENERATION_FORMAT,
    PROMPT_WITH_INPUT_FORMAT,
)


def format_training_text(instruction: str, response: str, context: str | None = None) -> str:
    """Render one record with Dolly's training template (with an ``Input:`` section when there is a context)."""
    if context:
        return PROMPT_WITH_INPUT_FORMAT.format(instruction=instruction, response=response, input=context)
    return PROMPT_NO_INPUT_FORMAT.format(instruction=instruction, response=response)


def format_generation_prompt(instruction: str, context: str | None = None) -> str:
    """Render the prompt the model completes: the training text up to and including the response key."""
    if context:
        return PROMPT_WITH_INPUT_FOR_GENERATION_FORMAT.format(instruction=instruction, input=context)
    return PROMPT_FOR_GENERATION_FORMAT.format(instruction=instruction)
