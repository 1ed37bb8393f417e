"""Training through Spark: Databricks tables as data, and multi-node runs on a Spark cluster's workers.

**Tables.** Training ranks have no Spark session, so the notebook (the Spark driver) reads a table once, checks
every row as a dolly record (an error names the table, the row as Spark returned it, counted from 1, and the
field), and writes the rows to a JSON Lines file beside the run's output; the ranks train from that file.

**Multi-node.** Spark's distributors start one barrier task per node, and each task runs ``torchrun`` for that
node's processes, rendezvousing at the first task's executor. ``DeepspeedTorchDistributor`` runs one process per
GPU of each node (one per node on CPU workers) with the run's DeepSpeed config; a run without one (QLoRA) goes
through ``TorchDistributor``. Both run :mod:`training.spark_entry`, the trainer as a script file. The trainer's own
rules hold: only global rank 0 writes the output, its copy and its logs; each rank reads its own share of the
batches. The output folder and the data must be on storage every node sees.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from .checkpoints import write_atomically
from .data import DatasetRecordError, validate_record
from .launch import TrainingFailedError, failure_summary
from .saving import is_finished_output

logger = logging.getLogger(__name__)

ENTRY_SCRIPT = Path(__file__).resolve().parent / "spark_entry.py"


# ---- tables ----

def names_a_table(spark: Any, name: str) -> bool:
    """Whether ``name`` is a table (``catalog.schema.table``, ``schema.table`` or ``table``) of the session.

    Hub names (``owner/dataset``) and paths are never tables.
    """
    if spark is None or not name or "/" in name or os.path.exists(name):
        return False
    try:
        return bool(spark.catalog.tableExists(name))
    except Exception:  # an unparsable name is not a table
        return False


def table_records(spark: Any, table: str) -> Iterable[dict[str, str]]:
    """The table's rows as validated dolly records, in the order Spark returns them."""
    frame = spark.table(table)
    missing = [field for field in ("instruction", "response") if field not in frame.columns]
    if missing:
        raise DatasetRecordError(
            f"table {table}: no column {', '.join(repr(f) for f in missing)} (its columns: {', '.join(frame.columns)})"
        )
    for number, row in enumerate(frame.toLocalIterator(), start=1):
        yield validate_record(row.asDict(), f"table {table}, row {number}")


def table_to_jsonl(spark: Any, table: str, destination: str | os.PathLike) -> str:
    """Read and check a table through Spark and write its records as JSON Lines; returns the file's path."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) for record in table_records(spark, table)]
    if not lines:
        raise DatasetRecordError(f"table {table}: no rows")
    write_atomically(destination, "\n".join(lines) + "\n")
    logger.info("Read %d records from table %s into %s", len(lines), table, destination)
    return str(destination)


# ---- multi-node ----

def distributor_spec(
    *, num_nodes: int, processes_per_node: int, use_gpu: bool, deepspeed_config: str | None
) -> tuple[str, dict[str, Any]]:
    """Which of Spark's distributors runs the training, and its arguments.

    With a DeepSpeed config, ``DeepspeedTorchDistributor`` (it hands the config to each process itself); without
    one (QLoRA), ``TorchDistributor``. Without GPUs, Spark gives each node's task one process.
    """
    if not use_gpu and processes_per_node != 1:
        raise ValueError("on CPU workers Spark's distributors start one process per node: use processes_per_node=1")
    if deepspeed_config:
        return "pyspark.ml.deepspeed.deepspeed_distributor.DeepspeedTorchDistributor", {
            "numGpus": processes_per_node, "nnodes": num_nodes, "localMode": False, "useGpu": use_gpu,
            "deepspeedConfig": deepspeed_config,
        }
    return "pyspark.ml.torch.distributor.TorchDistributor", {
        "num_processes": num_nodes * processes_per_node, "local_mode": False, "use_gpu": use_gpu,
    }


def distributor(**spec: Any) -> Any:
    """Spark's distributor for :func:`distributor_spec` (needs an active Spark session)."""
    import importlib

    path, kwargs = distributor_spec(**spec)
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**kwargs)


def without_option(args: list[str], name: str) -> list[str]:
    """``args`` less ``name`` and its value."""
    if name not in args:
        return list(args)
    at = args.index(name)
    return args[:at] + args[at + 2 :]


def train_on_spark(
    trainer_args: list[str],
    *,
    num_nodes: int,
    processes_per_node: int = 1,
    use_gpu: bool = False,
) -> None:
    """Run ``python -m training.trainer TRAINER_ARGS`` on ``num_nodes`` Spark workers (the active Spark session's).

    Raises ``TrainingFailedError`` with the failing rank's output if training fails, or if it ends without a
    finished model in ``--local-output-dir``.
    """
    output_dir = trainer_args[trainer_args.index("--local-output-dir") + 1]
    config = trainer_args[trainer_args.index("--deepspeed") + 1] if "--deepspeed" in trainer_args else None
    runner = distributor(num_nodes=num_nodes, processes_per_node=processes_per_node, use_gpu=use_gpu, deepspeed_config=config)
    args = trainer_args
    if config:
        args = without_option(trainer_args, "--deepspeed")  # the distributor passes the config (see spark_entry)
    logger.info("Training on %d Spark workers with %s", num_nodes, type(runner).__name__)
    try:
        runner.run(str(ENTRY_SCRIPT), *args)
    except Exception as err:
        raise TrainingFailedError(
            f"training on Spark failed. The failing rank reported:\n{failure_summary(str(err).splitlines())}"
        ) from err
    if not is_finished_output(output_dir):
        raise TrainingFailedError(f"training on Spark ended without a finished model in {output_dir}")
