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
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..columns import Columns
from ..data import OPTIONAL_FIELDS, REQUIRED_FIELDS, DatasetRecordError, validate_record
from ..rank.checkpoints import write_atomically
from ..rank.saving import is_finished_output
from ..settings import command_line
from .launch import TrainingFailedError, failure_summary, stopped_error, wait_stopping_on_interrupt
from .plan import LaunchPlan

logger = logging.getLogger(__name__)

ENTRY_SCRIPT = Path(__file__).resolve().parents[1] / "rank" / "spark_entry.py"


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


def table_records(spark: Any, table: str, columns: str | None = None) -> Iterable[dict[str, Any]]:
    """The table's rows, checked as dolly records in the user's ``columns``, in the order Spark returns them: each
    row's mapped columns, under the table's own names (the ranks read them with the same mapping)."""
    mapping = Columns.parse(columns)
    frame = spark.table(table)
    missing = [
        f"'{getattr(mapping, field)}'" + ("" if getattr(mapping, field) == field else f" (the {field})")
        for field in REQUIRED_FIELDS
        if getattr(mapping, field) not in frame.columns
    ]
    if missing:
        raise DatasetRecordError(
            f"table {table}: no column {', '.join(missing)} (its columns: {', '.join(frame.columns)})"
        )
    wanted = [getattr(mapping, item) for item in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)]
    for number, row in enumerate(frame.toLocalIterator(), start=1):
        raw = row.asDict()
        validate_record(raw, f"table {table}, row {number}", mapping)
        yield {column: raw[column] for column in wanted if column in raw}


def table_to_jsonl(spark: Any, table: str, destination: str | os.PathLike, columns: str | None = None) -> str:
    """Read and check a table through Spark and write its records as JSON Lines; returns the file's path."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) for record in table_records(spark, table, columns)]
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
            "numGpus": processes_per_node,
            "nnodes": num_nodes,
            "localMode": False,
            "useGpu": use_gpu,
            "deepspeedConfig": deepspeed_config,
        }
    return "pyspark.ml.torch.distributor.TorchDistributor", {
        "num_processes": num_nodes * processes_per_node,
        "local_mode": False,
        "use_gpu": use_gpu,
    }


def distributor(**spec: Any) -> Any:
    """Spark's distributor for :func:`distributor_spec` (needs an active Spark session)."""
    import importlib

    path, kwargs = distributor_spec(**spec)
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**kwargs)


def processes_per_node(plan: LaunchPlan, spark: Any) -> int:
    """Training processes per worker: the plan's, else each worker's GPUs as the cluster says."""
    if plan.processes_per_node is not None:
        return plan.processes_per_node
    gpus = spark.conf.get("spark.executor.resource.gpu.amount", None)
    if not gpus:
        raise ValueError(
            "set num_gpus to the GPUs per worker (the cluster does not say: spark.executor.resource.gpu.amount)"
        )
    return int(float(gpus))


def train_on_spark(plan: LaunchPlan, spark: Any) -> None:
    """Run the plan's training on ``plan.num_nodes`` workers of the ``spark`` session's cluster.

    The trainer's flags are written here, where the distributor starts the processes: every setting but the
    DeepSpeed config, which the distributor hands each process itself (see ``training.rank.spark_entry``). Raises
    ``TrainingFailedError`` with the failing rank's output if training fails, or if it ends without a finished model
    in the plan's output folder.
    """
    config = plan.settings.deepspeed
    runner = distributor(
        num_nodes=plan.num_nodes,
        processes_per_node=processes_per_node(plan, spark),
        use_gpu=plan.use_gpu,
        deepspeed_config=config,
    )
    flags = command_line({**plan.settings.overrides(), "deepspeed": None})
    logger.info("Training on %d Spark workers with %s", plan.num_nodes, type(runner).__name__)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            runner.run(str(ENTRY_SCRIPT), *flags)
        except BaseException as err:  # reported by the waiting thread
            outcome["error"] = err

    # The distributor runs in a thread, so that an interrupt reaches this one: the first asks the ranks to stop after
    # their step (the stop file, on the storage every node sees), a second cancels the Spark job.
    worker = threading.Thread(target=run, name="spark-distributor", daemon=True)
    worker.start()
    _, stop_requested = wait_stopping_on_interrupt(
        worker.join, plan.output_dir, stop_at_once=spark.sparkContext.cancelAllJobs
    )
    error = outcome.get("error")
    if error is not None and stop_requested:
        raise stopped_error(plan.output_dir, "the Spark job ended") from error
    if error is not None:
        raise TrainingFailedError(
            f"training on Spark failed. The failing rank reported:\n{failure_summary(str(error).splitlines())}"
        ) from error
    if not is_finished_output(plan.output_dir):
        raise TrainingFailedError(f"training on Spark ended without a finished model in {plan.output_dir}")
