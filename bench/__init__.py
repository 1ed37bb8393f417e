"""The benchmarks. Importing ``training`` first installs its filters for library log lines nobody can act on
(training/logs.py) before a benchmark's own imports load those libraries."""

import training  # noqa: F401
