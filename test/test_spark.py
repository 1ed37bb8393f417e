"""Training through Spark, on a real local Spark cluster with two workers (``local-cluster[2,1,1024]``): data from
a table saved in the session, the run on both workers through Spark's distributor, the model through the pipeline.

Every Spark and rendezvous address is the loopback one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, TEST_DIR, notebook_cells

from training.data import DatasetRecordError, read_records
from training.driver.notebook import RunPaths, notebook_plan
from training.driver.spark import ENTRY_SCRIPT, distributor, distributor_spec, names_a_table, table_to_parquet
from training.rank.run_record import RUN_CONFIG_NAME
from training.rank.spark_entry import trainer_args

pytestmark = pytest.mark.launch

CPU_CONFIG = str(PROJECT_ROOT / "config" / "cpu_config.json")


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    warehouse = tmp_path_factory.mktemp("spark-warehouse")
    loopback = {
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    saved = {name: os.environ.get(name) for name in loopback}
    os.environ.update(loopback)
    path = os.pathsep.join([str(PROJECT_ROOT), str(TEST_DIR)])
    session = (
        SparkSession.builder.master("local-cluster[2,1,1024]")
        .appName("dolly-tests")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.warehouse.dir", str(warehouse))
        .config("spark.executorEnv.PYTHONPATH", path)
        .config("spark.executorEnv.TOKENIZERS_PARALLELISM", "false")
        .config("spark.task.maxFailures", "1")
        .config("spark.stage.maxConsecutiveAttempts", "1")
        .getOrCreate()
    )
    yield session
    session.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def save_table(spark, name: str, records: list[dict]) -> str:
    spark.createDataFrame(records).coalesce(1).write.mode("overwrite").saveAsTable(name)
    return f"default.{name}"


def test_trains_from_a_table_on_two_spark_workers_then_answers(spark, tiny_model_dir, sample_path, tmp_path):
    records = [json.loads(line) for line in sample_path.read_text().splitlines() if line.strip()]
    table = save_table(spark, "dolly_sample", records)
    assert names_a_table(spark, table) and not names_a_table(spark, "databricks/databricks-dolly-15k")
    data = table_to_parquet(spark, table, tmp_path / "prepared")
    # Every row, in a fixed order (sorted by content), whatever order Spark read them in.
    assert [r["instruction"] for r in read_records(data)] == sorted(r["instruction"] for r in records)
    assert table_to_parquet(spark, table, tmp_path / "prepared") == data  # the same rows: the same folder

    # Preparing the copy reads its Parquet once (its digest is Spark's, kept in its marker); the ranks, handed the
    # digest with the plan, read nothing of it.
    import dataclasses

    from training.data import SOURCE_BYTES_READ
    from training.driver.notebook import prepare_training_data
    from training.rank.training_data import prepare_on_main, resolved_max_length
    from training.settings import TrainSettings

    parquet = {str(path): path.stat().st_size for path in Path(data).glob("*.parquet")}
    settings = TrainSettings(
        input_model=str(tiny_model_dir), training_dataset=data, local_output_dir=str(tmp_path / "runs" / "a")
    )
    SOURCE_BYTES_READ.clear()
    digest = prepare_training_data(settings)
    handed = dataclasses.replace(settings, source_digest=digest)
    prepare_on_main(handed, resolved_max_length(handed), None)
    assert digest.startswith("table:default.dolly_sample@") and set(SOURCE_BYTES_READ) == set(parquet)
    for name, size in parquet.items():  # every byte once, plus pyarrow's look at the footer (the last 64 KiB at most)
        assert size <= SOURCE_BYTES_READ[name] <= size + min(size, 64 * 1024), (name, SOURCE_BYTES_READ[name], size)

    # The notebook's launch cell, as it runs with num_nodes=2 (its plan built as the notebook builds it).
    paths = RunPaths(str(tmp_path / "out"), None, str(tmp_path / "out" / "runs"))
    plan = notebook_plan(
        input_model=str(tiny_model_dir),
        gpu_family="cpu",
        paths=paths,
        num_gpus="2",
        training_dataset=data,
        num_nodes=2,
        overrides={"max_steps": 3},
    )
    assert plan.launcher == "spark" and plan.processes_per_node == 1
    launch_cell = next(cell for cell in notebook_cells() if "launch_training(plan, spark=spark)" in cell)
    exec(launch_cell, {"plan": plan, "spark": spark})

    out = tmp_path / "out"
    record = json.loads((out / RUN_CONFIG_NAME).read_text())
    assert record["resolved"]["world_size"] == 2  # one rank on each worker
    assert record["settings"]["deepspeed"] == CPU_CONFIG  # handed over by Spark's DeepSpeed distributor
    assert record["resolved"]["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert record["data"]["records"] == len(records)
    from transformers import pipeline

    generator = pipeline(model=str(out), trust_remote_code=True)
    answer = generator("Name a colour.", max_new_tokens=8, do_sample=False)
    assert isinstance(answer[0]["generated_text"], str)


def test_a_bad_row_is_named_by_table_and_row(spark, sample_path, tmp_path):
    records = [json.loads(line) for line in sample_path.read_text().splitlines()[:5]]
    records[2]["response"] = "  "
    table = save_table(spark, "dolly_bad_row", records)
    with pytest.raises(DatasetRecordError, match=r"table default\.dolly_bad_row, row 3: field 'response' is empty"):
        table_to_parquet(spark, table, tmp_path)
    assert not (tmp_path / "tables").exists()
    no_response = save_table(spark, "dolly_no_response", [{"instruction": "x", "answer": "y"}])
    with pytest.raises(DatasetRecordError, match=r"table default\.dolly_no_response: no column 'response'"):
        table_to_parquet(spark, no_response, tmp_path)
    numbers = save_table(spark, "dolly_numbers", [{"instruction": "x", "response": 7}])
    with pytest.raises(DatasetRecordError, match=r"table default\.dolly_numbers: field 'response' must hold strings"):
        table_to_parquet(spark, numbers, tmp_path)


def test_a_run_folder_the_workers_do_not_share_is_refused_before_the_launch(spark, tmp_path):
    from training.driver.spark import NotSharedError, check_shared_storage

    # The same absolute path, a different folder on each machine (as /local_disk0 is on Databricks): the driver's
    # working folder and each worker's are different folders behind the one path /proc/self/cwd.
    node_local = "/proc/self/cwd/dolly-check"
    try:
        with pytest.raises(NotSharedError, match="set the local_training_root widget to storage every node sees"):
            check_shared_storage(spark, node_local, 2, widget="local_training_root")
    finally:
        os.rmdir(node_local)
    check_shared_storage(spark, tmp_path / "shared", 2, widget="local_training_root")  # a folder both see
    assert not list((tmp_path / "shared").iterdir())  # the probe is taken away


def test_a_table_copy_on_disks_the_driver_cannot_see_is_never_marked_complete(
    spark, sample_path, tmp_path, monkeypatch
):
    """Spark's executors write a table's Parquet to a path each process resolves to its own folder (as /local_disk0
    is one path and a disk per node on Databricks): the driver's folder gets no rows, so the copy is refused and never
    marked complete, and no later run reuses it. With executors on other hosts, a local path is refused before any
    write."""
    import shutil
    import uuid

    import training.driver.spark as spark_module
    from training.driver.spark import TABLE_INFO_NAME, TableCopyError, executor_hosts

    records = [json.loads(line) for line in sample_path.read_text().splitlines()[:6]]
    table = save_table(spark, "dolly_unshared", records)
    assert executor_hosts(spark) == set()  # local-cluster: every executor on the driver's loopback host
    node_local = Path(f"/proc/self/cwd/dolly-tables-{uuid.uuid4().hex[:8]}")  # a folder per process, one path
    try:
        with pytest.raises(TableCopyError, match=r"but this driver finds 0 there: the executors wrote to storage"):
            table_to_parquet(spark, table, node_local)
        assert not list(node_local.rglob(TABLE_INFO_NAME)) and not list(node_local.rglob("*.parquet"))
    finally:
        shutil.rmtree(Path.cwd() / node_local.name, ignore_errors=True)
    monkeypatch.setattr(spark_module, "executor_hosts", lambda session: {"10.0.3.7", "10.0.3.8"})  # workers
    with pytest.raises(TableCopyError, match=r"executors run on other hosts \(10\.0\.3\.7, 10\.0\.3\.8\)"):
        table_to_parquet(spark, table, tmp_path / "local_disk0")
    assert not (tmp_path / "local_disk0" / "tables").exists() or not list((tmp_path / "local_disk0").rglob("*.parquet"))


LARGE_TABLE_ROWS = 100_000


def anonymous_memory() -> int:
    """This process's RssAnon (bytes): memory that is not a file's pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def large_frame(spark, bad_row_id: int | None = None):
    from pyspark.sql import functions as F

    ids = F.col("id").cast("string")
    response = F.concat(F.lit("A note about the fox, number "), ids, F.lit("."))
    if bad_row_id is not None:
        response = F.when(F.col("id") == bad_row_id, F.lit(" ")).otherwise(response)
    return spark.range(LARGE_TABLE_ROWS).select(
        F.concat(F.lit("Summarise note "), ids).alias("instruction"),
        F.concat(
            F.lit("Note "), ids, F.lit(": "), F.repeat(F.lit("The quick brown fox jumps over the dog. "), 12)
        ).alias("context"),
        response.alias("response"),
        F.lit("summarization").alias("category"),
    )


def test_a_large_table_skips_the_drivers_memory_and_trains(spark, tiny_model_dir, tmp_path):
    from helpers import assert_finished, invoke_trainer, quick_training_args

    large_frame(spark).coalesce(1).write.mode("overwrite").saveAsTable("dolly_large")
    table_bytes = LARGE_TABLE_ROWS * 560  # about 560 bytes of text a row
    peak, sampling = [anonymous_memory()], threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            peak.append(anonymous_memory())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        folder = table_to_parquet(spark, "default.dolly_large", tmp_path / "prepared")
    finally:
        sampling.set()
        sampler.join()
    growth = max(peak) - peak[0]
    # The old way (toLocalIterator, one JSON string) held every row here: more than the table's 56 MB.
    assert growth < table_bytes / 5, f"the driver grew by {growth / 1e6:.0f} MB for a {table_bytes / 1e6:.0f} MB table"

    args = quick_training_args(tiny_model_dir, Path(folder), tmp_path / "out", "--max-steps", "1", "--test-size", "0")
    run = invoke_trainer([*args, "--eval-answers", "0", "--no-mlflow", "--save-steps", "100"])
    assert_finished(run)
    record = json.loads((tmp_path / "out" / RUN_CONFIG_NAME).read_text())
    assert record["data"]["records"] == LARGE_TABLE_ROWS

    # A bad row among them is still named by the table, its row (in the table's order) and its column.
    large_frame(spark, bad_row_id=73_210).coalesce(1).write.mode("overwrite").saveAsTable("dolly_large_bad")
    with pytest.raises(
        DatasetRecordError, match=r"table default\.dolly_large_bad, row 73211: field 'response' is empty"
    ):
        table_to_parquet(spark, "default.dolly_large_bad", tmp_path / "prepared")


def test_the_distributor_commands_reach_the_trainer(spark, monkeypatch):
    """On CPU workers, Spark's torch distributor with our DeepSpeed config; on GPUs, its DeepSpeed distributor: the
    command each builds must give the trainer the config and the flags it was given."""
    from pyspark.ml.deepspeed.deepspeed_distributor import DeepspeedTorchDistributor
    from pyspark.ml.torch.distributor import TorchDistributor

    from training.settings import given_settings
    from training.trainer import main

    flags = ["--input-model", "m", "--local-output-dir", "/shared/out", "--epochs", "1"]
    # The GPU distributor needs a cluster with GPU resources to be built, so its arguments are checked here.
    name, kwargs = distributor_spec(num_nodes=2, processes_per_node=8, use_gpu=True, deepspeed_config=CPU_CONFIG)
    assert name.endswith(".DeepspeedTorchDistributor")
    assert kwargs == {"numGpus": 8, "nnodes": 2, "localMode": False, "useGpu": True, "deepspeedConfig": CPU_CONFIG}
    cpu = distributor(num_nodes=2, processes_per_node=1, use_gpu=False, deepspeed_config=CPU_CONFIG)
    assert type(cpu) is DeepspeedTorchDistributor and cpu.num_processes == 2 and not cpu.use_gpu
    qlora = distributor(num_nodes=2, processes_per_node=1, use_gpu=False, deepspeed_config=None)
    assert type(qlora) is TorchDistributor and qlora.num_processes == 2
    with pytest.raises(ValueError, match="one process per node"):
        distributor_spec(num_nodes=2, processes_per_node=2, use_gpu=False, deepspeed_config=None)

    # What a barrier task of node 1 sees on an 8-GPU worker.
    for name, value in {
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        "RANK": "1",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        "PYSPARK_TORCH_DISTRIBUTOR_RDZV_ID": "r",
    }.items():
        monkeypatch.setenv(name, value)
    command = DeepspeedTorchDistributor._create_torchrun_command(
        {"local_mode": False, "num_processes": 16, "deepspeed_config": CPU_CONFIG}, str(ENTRY_SCRIPT), *flags
    )
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_endpoint=10.0.0.1:29400", "--nproc_per_node=8"} <= set(command)
    script_args = command[command.index(str(ENTRY_SCRIPT)) + 1 :]
    settings = given_settings(main.make_context("trainer", trainer_args(script_args)))
    assert (
        settings["deepspeed"] == CPU_CONFIG
        and settings["epochs"] == 1
        and settings["local_output_dir"] == "/shared/out"
    )

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU worker's task
    command = TorchDistributor._create_torchrun_command(
        {"local_mode": False, "num_processes": 2}, str(ENTRY_SCRIPT), *flags
    )
    assert {"--nnodes=2", "--node_rank=1", "--nproc_per_node=1"} <= set(command)
    script_args = command[command.index(str(ENTRY_SCRIPT)) + 1 :]
    assert "deepspeed" not in given_settings(main.make_context("trainer", trainer_args(script_args)))
