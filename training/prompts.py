"""Rendering records and instructions with Dolly's templates (kept at this path for code written against it).

The functions live in :mod:`training.saved_model.prompts`, which travels with every saved model.
"""

from .saved_model.prompts import format_generation_prompt, format_training_text

__all__ = ["format_generation_prompt", "format_training_text"]
