"""Training through Spark: Databricks tables as data, and multi-node runs on a Spark cluster's workers.

**Tables.** Training ranks have no Spark session, so the notebook (the Spark driver) has Spark check every row as a
dolly record (an error names the table, the row as Spark reads it, counted from 1, and the field) and write the
rows as Parquet, sorted, into the prepared-data cache (:func:`table_to_parquet`); the ranks train from that folder.
The rows never pass through the driver's memory.

**Multi-node.** Spark's distributors start one barrier task per node, and each task runs ``torchrun`` for that
node's processes, rendezvousing at the first task's executor. ``DeepspeedTorchDistributor`` runs one process per
GPU of each node (one per node on CPU workers) with the run's DeepSpeed config; a run without one (QLoRA) goes
through ``TorchDistributor``. Both run :mod:`training.spark_entry`, the trainer as a script file. The trainer's own
rules hold: only global rank 0 writes the output, its copy and its logs; each rank reads its own share of the
batches. The output folder and the data must be on storage every node sees.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..columns import Columns
from ..data import OPTIONAL_FIELDS, REQUIRED_FIELDS, TABLE_COPY_MARKER, DatasetRecordError, validate_record
from ..folder_commit import building_folder, commit, mark_complete, read_marker, sweep_abandoned_builds
from ..rank.saving import is_finished_output
from ..settings import command_line
from .launch_outcome import TrainingFailedError, failure_summary, stopped_error, wait_stopping_on_interrupt
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


ROW_ID = "_dolly_row_id"
PARTITION_SHIFT = 33  # monotonically_increasing_id: the partition in the upper bits, the row within it below
TABLE_INFO_NAME = TABLE_COPY_MARKER  # the copy's completion marker; hidden: the folder reader takes every .json


class TableCopyError(RuntimeError):
    """A table's copy would go, or went, where the driver and the ranks cannot read it."""


def spark_uri(path: str | os.PathLike) -> str:
    """Where Spark writes a path the ranks read as a file path: ``/dbfs/x`` as ``dbfs:/x``, a Unity Catalog volume
    as it is, anything else as a local file (``file:``)."""
    path = str(path)
    if path.startswith("/dbfs/"):
        return "dbfs:" + path[len("/dbfs") :]
    if path.startswith("/Volumes/"):
        return path
    return "file:" + str(Path(path).absolute())


def _checked_frame(spark: Any, table: str, mapping: Columns) -> tuple[Any, list[str]]:
    """The table and its mapped columns, after the checks its schema allows (columns there, strings)."""
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
    wanted = [column for column in wanted if column in frame.columns]
    types = dict(frame.dtypes)
    for field in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        column = getattr(mapping, field)
        if column in types and types[column] != "string":
            raise DatasetRecordError(
                f"table {table}: {mapping.describe(field)} must hold strings, its type is {types[column]}"
            )
    return frame, wanted


def _table_summary(frame: Any, wanted: list[str], mapping: Columns) -> tuple[int, str, int | None]:
    """One pass over the table in Spark: its row count, a digest of its rows (the same whatever their order), and
    the id of its first row that is not a dolly record (None when every row is)."""
    from pyspark.sql import functions as F

    bad = F.lit(False)
    for field in REQUIRED_FIELDS:
        column = F.col(getattr(mapping, field))
        bad = bad | column.isNull() | column.rlike(r"^\s*$")
    digest_input = [F.coalesce(F.col(column), F.lit("\u0000null")) for column in wanted]
    row = frame.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.xxhash64(*digest_input).cast("decimal(38,0)")).alias("digest"),
        F.min(F.when(bad, F.col(ROW_ID))).alias("first_bad"),
    ).first()
    digest = hashlib.sha256(f"{wanted}|{row['rows']}|{row['digest']}".encode()).hexdigest()[:20]
    return int(row["rows"]), digest, row["first_bad"]


def _raise_for_row(frame: Any, table: str, mapping: Columns, row_id: int) -> None:
    """The error for the row ``row_id``, named by its number in the order Spark reads the table (from 1)."""
    from pyspark.sql import functions as F

    partition, offset = row_id >> PARTITION_SHIFT, row_id & ((1 << PARTITION_SHIFT) - 1)
    before = frame.filter(F.shiftright(F.col(ROW_ID), PARTITION_SHIFT) < partition).count()
    row = frame.filter(F.col(ROW_ID) == row_id).first().asDict()
    del row[ROW_ID]
    validate_record(row, f"table {table}, row {before + offset + 1}", mapping)
    raise DatasetRecordError(
        f"table {table}, row {before + offset + 1}: not a dolly record"
    )  # Python's own check passed


def table_to_parquet(spark: Any, table: str, cache_dir: str | os.PathLike, columns: str | None = None) -> str:
    """Check a table's rows as dolly records in Spark and have Spark write them as Parquet, sorted by their content
    (a fixed order, whatever order Spark reads them in), into ``cache_dir/tables/``; returns the folder.

    Nothing of the table passes through this process: Spark computes the checks and a digest of the rows (one pass),
    and its executors write the files. A table with the same rows again reuses its folder. An error names the table,
    the row (in the order Spark reads the table, counted from 1) and the column, as for a file.
    """
    from pyspark.sql import functions as F

    mapping = Columns.parse(columns)
    frame, wanted = _checked_frame(spark, table, mapping)
    frame = frame.select(*wanted, F.monotonically_increasing_id().alias(ROW_ID))
    rows, digest, first_bad = _table_summary(frame, wanted, mapping)
    if rows == 0:
        raise DatasetRecordError(f"table {table}: no rows")
    if first_bad is not None:
        _raise_for_row(frame, table, mapping, first_bad)
    folder = Path(cache_dir) / "tables" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', table)}-{digest}"
    if read_marker(folder, TABLE_INFO_NAME) is not None:
        logger.info("Reusing %s for table %s (the same %d rows)", folder, table, rows)
        return str(folder)
    refuse_unshared_destination(spark, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned_builds(folder.parent)
    building = building_folder(folder)
    try:
        frame.select(*wanted).orderBy(*wanted).write.mode("overwrite").parquet(spark_uri(building))
        (building / "_SUCCESS").unlink(missing_ok=True)  # Spark's marker: not data; ours marks it complete
        written = parquet_rows(building)
        if written != rows:
            raise TableCopyError(
                f"table {table}: Spark wrote its {rows} rows to {spark_uri(building)}, but this driver finds {written} "
                "there: the executors wrote to storage the driver does not see (their own local disks?). Copy tables to "
                "storage every node sees: a Unity Catalog volume (the volume widget) or a shared filesystem"
            )
        # Spark's digest of the rows names the copy's content: preparing it needs no digest pass of its own.
        mark_complete(building, TABLE_INFO_NAME, table=table, rows=rows, columns=wanted, digest=digest)
        if not commit(building, folder, TABLE_INFO_NAME):  # another run wrote the same rows first
            logger.info("Another run copied table %s first; using its copy", table)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    logger.info("Wrote the %d rows of table %s to %s", rows, table, folder)
    return str(folder)


def parquet_rows(folder: Path) -> int:
    """Rows in the Parquet files of ``folder`` as this process sees them (their footers only)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows for path in sorted(folder.glob("*.parquet")))


def executor_hosts(spark: Any) -> set[str]:
    """The hosts of the cluster's executors but the driver's (empty in local mode, where the driver runs the tasks)."""
    infos = spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()  # the driver's own entry included
    driver = spark.sparkContext.getConf().get("spark.driver.host", "")
    return {str(info.host()) for info in infos} - {driver}


def refuse_unshared_destination(spark: Any, folder: Path) -> None:
    """Refuse a local (``file:``) destination when executors run on other hosts: they would write to their own
    disks, and the driver's folder would get nothing but Spark's markers."""
    if not spark_uri(folder).startswith("file:"):
        return
    local = {socket.gethostname(), "localhost", "127.0.0.1"}
    remote = sorted(executor_hosts(spark) - local)
    if remote:
        raise TableCopyError(
            f"{folder} is on this driver's local disk, and the cluster's executors run on other hosts "
            f"({', '.join(remote[:3])}{', ...' if len(remote) > 3 else ''}): they would write the table's rows to "
            "their own disks. Copy tables to storage every node sees: set the volume widget to a Unity Catalog volume "
            "(/Volumes/<catalog>/<schema>/<volume>), or local_training_root to a shared filesystem"
        )


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


SHARED_CHECK_PREFIX = ".dolly-shared-check-"


class NotSharedError(RuntimeError):
    """The run's folder is not the same folder on every worker."""


def check_shared_storage(spark: Any, folder: str | os.PathLike, num_nodes: int, *, widget: str) -> None:
    """Refuse a run folder that a worker does not see as the driver does: the driver writes a file there, and a task
    on each of ``num_nodes`` workers (scheduled together, as the distributor's are) looks for it. Records,
    checkpoints, the stop file and the finished model all live in that folder, so every node must share it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = folder / f"{SHARED_CHECK_PREFIX}{token}"
    probe.write_text(token)

    def look(_: Any) -> Iterable[tuple[str, bool]]:
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        yield socket.gethostname(), seen

    try:
        views = spark.sparkContext.parallelize(range(num_nodes), num_nodes).barrier().mapPartitions(look).collect()
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted({host for host, seen in views if not seen})
    if blind:
        raise NotSharedError(
            f"{folder} is not shared by the workers ({', '.join(blind)} cannot see a file the driver wrote there): "
            f"with num_nodes {num_nodes}, set the {widget} widget to storage every node sees (on Databricks a Unity "
            "Catalog volume, /Volumes/..., or /dbfs/...; elsewhere a shared filesystem): records, checkpoints, the "
            "stop file and the finished model all live there"
        )
    logger.info("%s is shared by the %d workers", folder, num_nodes)


def train_on_spark(plan: LaunchPlan, spark: Any) -> None:
    """Run the plan's training on ``plan.num_nodes`` workers of the ``spark`` session's cluster.

    The trainer's flags are written here, where the distributor starts the processes: every setting but the
    DeepSpeed config, which the distributor hands each process itself (see ``training.rank.spark_entry``). Raises
    ``TrainingFailedError`` with the failing rank's output if training fails, or if it ends without a finished model
    in the plan's output folder.
    """
    check_shared_storage(spark, plan.output_dir, plan.num_nodes, widget="local_training_root")
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
        worker.join, plan.output_dir, stop_at_once=spark.sparkContext.cancelAllJobs, launch_id=plan.launch_id
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
