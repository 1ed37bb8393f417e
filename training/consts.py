"""Dolly's constants and prompt templates, at Dolly's path (``training.consts``).

They live in :mod:`training.saved_model.consts`, which is copied beside every saved model with the pipeline.
"""

from .saved_model.consts import *  # noqa: F403
from .saved_model.consts import __all__  # noqa: F401
