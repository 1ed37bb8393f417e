# Databricks notebook source
# MAGIC %md
# MAGIC ## Train Dolly
# MAGIC
# MAGIC Fine-tunes a base causal language model (EleutherAI Pythia by default) on the databricks-dolly-15k
# MAGIC instruction records with the Dolly prompt template, using DeepSpeed, then answers a few instructions with
# MAGIC the result.
# MAGIC
# MAGIC **On Databricks**: attach to a GPU cluster (for example 8x A100 for pythia-12b; see the README for which
# MAGIC model fits where), set the widgets above and run all cells. The `%pip` and `%tensorboard` cells are
# MAGIC Databricks magics; `%pip` keeps the runtime's torch. With `num_nodes` above 1 the run trains on that many
# MAGIC of the cluster's workers through Spark, and `training_dataset` may name a table (`catalog.schema.table`).
# MAGIC
# MAGIC **Anywhere else**: `python train_dolly.py` runs this same file. Widget values come from flags
# MAGIC (`--gpu_family a100 --input_model EleutherAI/pythia-2.8b ...`) or `DOLLY_<WIDGET>` environment variables,
# MAGIC and with nothing given it trains the embedded 135M pretrained model on the project's sample data on CPU,
# MAGIC offline, in a few minutes. The magic lines are comments there and are skipped.

# COMMAND ----------

# MAGIC %pip install -r requirements_no_torch.txt

# COMMAND ----------

# Databricks: the runtime's own CUDA build of torch stays (requirements_no_torch.txt is requirements.txt less torch;
# to use the tested torch 2.13 instead, install requirements.txt above). Restart Python to load what was installed.
if "dbutils" in globals():
    globals()["dbutils"].library.restartPython()

# COMMAND ----------

import logging

if "dbutils" not in globals() and __name__ == "__main__":
    # Outside Databricks: create .venv and install the requirements on first use, then continue inside it.
    from training.driver.env_setup import reexec_in_env

    reexec_in_env("requirements.txt")

from training.logs import configure_logging

configure_logging()
logging.getLogger("py4j").setLevel(logging.WARNING)
logging.getLogger("sh.command").setLevel(logging.ERROR)

# COMMAND ----------

from training.driver.notebook import NotebookWidgets, on_databricks

databricks = on_databricks(globals())
widgets = NotebookWidgets(globals().get("dbutils"))

# COMMAND ----------

from training.driver.notebook import notebook_spark, resolve_input_model
from training.driver.spark import names_a_table
from training.rank.modeling import load_tokenizer

# Resolve the model and its tokenizer here, before a group of DeepSpeed processes is started.
input_model = resolve_input_model(widgets.get("input_model"))
training_dataset = widgets.get("training_dataset")
num_nodes = int(widgets.get("num_nodes") or 1)
# Databricks' Spark session; elsewhere one on the spark_master widget's cluster, if given.
spark = notebook_spark(globals(), widgets.get("spark_master"), num_nodes)
columns = widgets.get("columns") or None  # the data's own column names, mapped onto the dolly fields
dataset_is_table = names_a_table(spark, training_dataset)  # catalog.schema.table: read through Spark below
load_tokenizer(input_model)  # the data is read and checked once, when it is prepared below

# COMMAND ----------

import os

from training.driver.notebook import GPU_FAMILIES, claim_run_dir, run_paths
from training.driver.storage import notebook_volume, table_copy_dir

# On Databricks, a Unity Catalog volume holds the model's copy, multi-node runs and table copies (the volume widget;
# empty: the current catalog and schema's "dolly" volume, created when you may). DBFS only when dbfs_output_root
# names it. A new run gets a folder of its own; resume_run continues a stopped run in its folder.
volume = notebook_volume(spark, widgets.get("volume"), databricks=databricks)
resume_run = widgets.get("resume_run")
paths = run_paths(
    widgets.get("experiment_id"),
    widgets.get("local_training_root"),
    widgets.get("dbfs_output_root"),
    databricks=databricks,
    resume_run=resume_run,
    num_nodes=num_nodes,
    volume=volume,
)
if not resume_run:
    paths = claim_run_dir(paths)
if paths.dbfs_output_dir:
    os.makedirs(os.path.dirname(paths.dbfs_output_dir), exist_ok=True)
tensorboard_display_dir = paths.tensorboard_display_dir

if dataset_is_table:
    from training.driver.spark import table_to_parquet
    from training.prepared_data import default_cache_dir

    # Checked and written as Parquet by Spark itself, into the volume on Databricks (the rows skip the driver).
    copy_dir = table_copy_dir(volume, databricks=databricks, fallback=str(default_cache_dir(paths.local_output_dir)))
    training_dataset = table_to_parquet(spark, training_dataset, copy_dir, columns)

print(f"Local Output Dir: {paths.local_output_dir}")
print(f"Copy of the finished model: {paths.dbfs_output_dir}")
print(f"Tensorboard Display Dir: {tensorboard_display_dir}")

from training.driver.notebook import mlflow_environment

# Every run is an MLflow run (rank 0 logs it): the workspace's on Databricks, else a store under the training root.
os.environ.update(
    mlflow_environment(
        databricks=databricks,
        experiment_id=widgets.get("experiment_id"),
        training_root=os.path.dirname(paths.local_output_dir),
    )
)
print(f"MLflow: {os.environ.get('MLFLOW_TRACKING_URI', 'MLflow default')}")

from training.driver.notebook import notebook_plan

# The launch, as one plan: the trainer's settings (the GPU family's recipe, the fine-tuning method, the widgets) and
# how its processes start (launcher, GPUs per node, nodes).
gpu_family = widgets.get("gpu_family")
plan = notebook_plan(
    input_model=input_model,
    gpu_family=gpu_family,
    paths=paths,
    num_gpus=widgets.get("num_gpus"),
    training_dataset=training_dataset,
    finetuning=widgets.get("finetuning"),
    num_nodes=num_nodes,
    launcher=widgets.get("launcher"),
    overrides={
        "columns": columns,
        "register_model": widgets.get("register_model") or None,
        **({"resume": True} if resume_run else {}),
    },
)
print(f"Launcher: {plan.launcher}, nodes: {plan.num_nodes}")
if plan.settings.deepspeed:
    print(f"Deepspeed config file: {plan.settings.deepspeed}")

from training.driver.notebook import prepare_training_data

# The data read, checked and tokenized once, here, into prepared_data/ beside the runs: the ranks memory-map it, and
# a later run on the same data, template, tokenizer, max length and seed reuses it (see "Large datasets"). The
# source's digest goes to the ranks with the plan, so they do not read the source again.
plan = plan.with_settings(source_digest=prepare_training_data(plan.settings))

# COMMAND ----------

# MAGIC %load_ext tensorboard
# MAGIC %tensorboard --logdir '{tensorboard_display_dir}'

# COMMAND ----------

from training.driver.launch import launch_training

# One node: the DeepSpeed launcher (or torchrun) here. More: one Spark worker per node, each running torchrun for its
# GPUs (see training/driver/spark.py).
launch_training(plan, spark=spark)

# COMMAND ----------

from training.driver.notebook import driver_generation_problem, loadable_model_dir
from training.generate import generate_response, load_model_tokenizer_for_generate

trained_model_dir = loadable_model_dir(paths)  # the output's copy when it is complete, else the output folder
# The cells below answer and evaluate in this notebook's process, as Dolly's did; where it has no GPU but the run
# trained on GPUs (a multi-node cluster's CPU driver), they say why and skip.
skip_generation = driver_generation_problem(gpu_family, trained_model_dir)
if skip_generation:
    print(skip_generation)
else:
    model, tokenizer = load_model_tokenizer_for_generate(
        trained_model_dir, dtype=GPU_FAMILIES[gpu_family].generation_dtype
    )

# COMMAND ----------

from training.driver.notebook import EXAMPLE_INSTRUCTIONS

# Examples from https://www.databricks.com/blog/2023/03/24/hello-dolly-democratizing-magic-chatgpt-open-models.html
for instruction in [] if skip_generation else EXAMPLE_INSTRUCTIONS:
    response = generate_response(instruction, model=model, tokenizer=tokenizer)
    print(f"Instruction: {instruction}\n\n{response or '(empty response)'}\n\n-----------\n")

# COMMAND ----------

from training.driver.notebook import evaluate_run
from training.evaluate import report

# Did training help? Held-out response loss, answers that stop at ### End, and answers side by side, for the model
# before and after training. The figures also go to the model card (README.md beside the model) and to MLflow.
if not skip_generation:
    evaluation = evaluate_run(paths, training_dataset, baseline=input_model)
    print(report(evaluation))

# COMMAND ----------

from training.driver.benchmarks import parse_tasks

# The dolly-v2 model card's benchmark table (EleutherAI's lm-evaluation-harness; its tasks' data comes from the
# Hugging Face hub): set the benchmarks widget to "dolly-v2", or to lm-eval task names. Empty: skipped.
benchmark_tasks = parse_tasks(widgets.get("benchmarks"))
if benchmark_tasks and not skip_generation:
    evaluation = evaluate_run(paths, None, baseline=input_model, benchmarks=benchmark_tasks)
    print(report(evaluation))
