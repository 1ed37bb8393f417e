"""Fine-tune causal language models to follow instructions, the Dolly way."""

from .logs import filter_unactionable

# Before any library this package uses is imported (some log as they are imported): see training/logs.py.
filter_unactionable()
