"""Did training help? ``python -m training.evaluate MODEL_DIR --dataset FILE [--baseline BASE_MODEL]``

For each model (the trained one, and the base model before training with ``--baseline``), on held-out records:

- **held-out response loss**: mean cross-entropy per response token (the prompt is masked, as in training),
  overall and per category;
- **stops at ``### End``**: the share of greedy answers that end with the end key rather than running out of
  tokens (Dolly's users met models that never stopped);
- **answers side by side**: the instruction, the reference response, and each model's greedy answer.

- **benchmarks** (``--benchmarks openbookqa,arc_easy,...``, or ``dolly-v2`` for the seven of the dolly-v2 model card):
  EleutherAI's lm-evaluation-harness on both models, laid out as the dolly-v2 card was, geometric mean included
  (``training.driver.benchmarks``).

Held-out records are the run's own evaluation split when ``--dataset`` is the data it trained on (rebuilt from its
``run_config.json``: same tokenizer, max length, seed and test size), else every record of ``--dataset``. The
figures are written to ``MODEL_DIR/evaluation.json``, into the model card, and to the run's MLflow run when it had
one.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Any

import click
import torch
from tqdm.auto import tqdm

from .data import load_training_dataset, with_training_text
from .driver.benchmarks import parse_tasks
from .generate import load_model_tokenizer_for_generate
from .logs import configure_logging
from .preprocess import IGNORE_INDEX, preprocess_batch
from .rank.collators import DataCollatorForCompletionOnlyLM
from .rank.run_record import RUN_CONFIG_NAME
from .saved_model.instruct_pipeline import InstructionTextGenerationPipeline
from .saved_model.model_card import EVALUATION_NAME, benchmark_table, read_json, write_model_card

logger = logging.getLogger(__name__)


def same_data(first: str, second: str) -> bool:
    """Whether two ``--training-dataset`` values name the same data (paths compared resolved)."""
    if Path(first).exists() and Path(second).exists():
        return Path(first).resolve() == Path(second).resolve()
    return first == second


def held_out_records(model_dir: str | Path, dataset: str, columns: str | None = None) -> list[dict[str, Any]]:
    """The records the run held out of ``dataset`` (its eval split), or all of them if it did not train on it.

    ``columns``: the data's columns for the dolly fields (``--columns``); by default the run's own mapping. The
    held-out records are found as the run found them: in its prepared dataset (prepared again, identically, where
    it is gone), split by the run's test size and seed.
    """
    record = read_json(Path(model_dir) / RUN_CONFIG_NAME)
    settings = record.get("settings", {})
    columns = columns if columns is not None else settings.get("columns")
    if not settings or not settings.get("test_size") or not same_data(settings["training_dataset"], dataset):
        raw = load_training_dataset(dataset, columns)
        logger.info("Evaluating on all %d records of %s", raw.num_rows, dataset)
        return list(raw)
    from .prepared_data import DataSpec, default_cache_dir, prepare_data, split_held_out
    from .rank.modeling import load_tokenizer

    recorded_path = record.get("data", {}).get("prepared_path")
    cache_dir = Path(recorded_path).parent if recorded_path else default_cache_dir(model_dir)
    spec = DataSpec(dataset, columns, record["resolved"]["max_length"], settings["seed"])
    prepared = prepare_data(spec, load_tokenizer(str(model_dir)), cache_dir).load()
    _, held_out = split_held_out(prepared, settings["test_size"], settings["seed"])
    held_out = held_out.remove_columns(["input_ids", "labels", "length"])
    records = list(held_out.map(with_training_text, batched=True))
    logger.info("Evaluating on the run's %d held-out records of %s", len(records), dataset)
    return records


@torch.no_grad()
def response_loss(model, tokenizer, records: list[dict[str, Any]], batch_size: int = 4) -> dict[str, Any]:
    """Mean loss per response token, overall and per category."""
    columns = {key: [record[key] for record in records] for key in ("text", "instruction", "context", "response")}
    tokenized = preprocess_batch(columns, tokenizer)
    collator = DataCollatorForCompletionOnlyLM(tokenizer=tokenizer)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for start in tqdm(range(0, len(records), batch_size), desc="Response loss", leave=False):
        rows = [
            {"input_ids": ids, "labels": labels}
            for ids, labels in zip(
                tokenized["input_ids"][start : start + batch_size], tokenized["labels"][start : start + batch_size]
            )
        ]
        batch = {key: value.to(model.device) for key, value in collator(rows).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        for offset, row_losses in enumerate(losses):
            category = records[start + offset].get("category") or "uncategorised"
            tokens = int((targets[offset] != IGNORE_INDEX).sum())
            for key in ("all", category):
                sums[key] += float(row_losses.sum())
                counts[key] += tokens
    return {
        "response_loss": sums["all"] / counts["all"],
        "response_loss_by_category": {key: sums[key] / counts[key] for key in sorted(sums) if key != "all"},
    }


def greedy_answers(model, tokenizer, records: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, str]]:
    """Each record's greedy answer and why it ended (``end_key``, ``eos`` or ``length``)."""
    pipeline = InstructionTextGenerationPipeline(
        model=model, tokenizer=tokenizer, do_sample=False, max_new_tokens=max_new_tokens
    )
    answers = []
    for record in tqdm(records, desc="Greedy answers", leave=False):
        request = {"instruction": record["instruction"], "context": record["context"] or None}
        output = pipeline(request, return_finish_reason=True)[0]
        answers.append({"answer": output["generated_text"], "finish_reason": output["finish_reason"]})
    return answers


def evaluate_model(name: str, records: list[dict[str, Any]], answered: int, max_new_tokens: int) -> tuple[dict, list]:
    model, tokenizer = load_model_tokenizer_for_generate(name)
    if tokenizer.pad_token is None:  # a base model's tokenizer may have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    metrics = response_loss(model, tokenizer, records)
    answers = greedy_answers(model, tokenizer, records[:answered], max_new_tokens)
    metrics["stops_at_end"] = sum(a["finish_reason"] == "end_key" for a in answers) / max(1, len(answers))
    return metrics, answers


def evaluate(
    model_dir: str | Path,
    dataset: str | None,
    *,
    baseline: str | None = None,
    answered: int = 4,
    max_new_tokens: int = 64,
    columns: str | None = None,
    benchmarks: list[str] | None = None,
    benchmark_tasks_dir: str | None = None,
    benchmark_limit: int | None = None,
) -> dict[str, Any]:
    """Evaluate the trained model (and ``baseline``, before training) and record the figures beside the model.

    ``dataset``: held-out records (loss, stopping, answers), in ``columns`` if not the run's own mapping.
    ``benchmarks``: lm-eval tasks (``training.driver.benchmarks``), from lm-eval's own or ``benchmark_tasks_dir``.
    Either part can run alone; figures from an earlier evaluation of the other part are kept.
    """
    model_dir = Path(model_dir)
    models = ([baseline] if baseline else []) + [str(model_dir)]
    result = read_json(model_dir / EVALUATION_NAME)
    if dataset:
        result.update(held_out_evaluation(model_dir, dataset, models, answered, max_new_tokens, columns))
    if benchmarks:
        from .driver.benchmarks import run_benchmarks

        scores = run_benchmarks(models, benchmarks, tasks_dir=benchmark_tasks_dir, limit=benchmark_limit)
        result["benchmarks"] = {**scores, "date": date.today().isoformat()}
    result["models"] = models
    (model_dir / EVALUATION_NAME).write_text(json.dumps(result, indent=2) + "\n")
    write_model_card(model_dir)
    log_to_mlflow(model_dir, result)
    return result


def held_out_evaluation(
    model_dir: Path, dataset: str, models: list[str], answered: int, max_new_tokens: int, columns: str | None
) -> dict[str, Any]:
    records = held_out_records(model_dir, dataset, columns)
    answered = min(answered, len(records))
    metrics: dict[str, Any] = {}
    samples = [
        {"instruction": r["instruction"], "context": r["context"], "reference": r["response"]}
        for r in records[:answered]
    ]
    for name in models:
        metrics[name], answers = evaluate_model(name, records, answered, max_new_tokens)
        for sample, answer in zip(samples, answers):
            sample[name] = answer["answer"]
    return {
        "dataset": dataset,
        "records": len(records),
        "answered": answered,
        "max_new_tokens": max_new_tokens,
        "metrics": metrics,
        "samples": samples,
        "date": date.today().isoformat(),
    }


def metric_prefix(model_dir: Path, models: list[str], name: str, kind: str) -> str:
    """``eval_trained`` / ``eval_baseline`` (``bench_...`` for benchmarks): which model a figure in MLflow is of."""
    index = models.index(name)
    return f"{kind}_trained" if name == str(model_dir) else f"{kind}_baseline{'' if index == 0 else index}"


def log_to_mlflow(model_dir: Path, result: dict[str, Any]) -> None:
    """Add the figures to the training's MLflow run, when it had one."""
    run_id = read_json(model_dir / RUN_CONFIG_NAME).get("resolved", {}).get("mlflow_run_id")
    if not run_id:
        return
    import mlflow

    models = result["models"]
    with mlflow.start_run(run_id=run_id):
        for name in result.get("metrics", {}):
            prefix = metric_prefix(model_dir, models, name, "eval")
            mlflow.log_metric(f"{prefix}_response_loss", result["metrics"][name]["response_loss"])
            mlflow.log_metric(f"{prefix}_stops_at_end", result["metrics"][name]["stops_at_end"])
        benchmarks = result.get("benchmarks")
        if benchmarks:
            for name, scores in benchmarks["scores"].items():
                prefix = metric_prefix(model_dir, models, name, "bench")
                for task, value in scores.items():
                    mlflow.log_metric(f"{prefix}_{task}", value)
                mlflow.log_metric(f"{prefix}_gmean", benchmarks["geometric_mean"][name])
        mlflow.log_artifact(str(model_dir / EVALUATION_NAME), artifact_path="evaluation")
        mlflow.log_artifact(str(model_dir / "README.md"), artifact_path="training")


def report(result: dict[str, Any]) -> str:
    """The figures and the answers side by side, as text."""
    lines = []
    if "metrics" in result:
        lines.append(f"{result['records']} held-out records of {result['dataset']}")
        for name in result["metrics"]:
            figures = result["metrics"][name]
            lines.append(
                f"{name}: response loss {figures['response_loss']:.3f}, "
                f"stops at ### End {figures['stops_at_end']:.0%} of {result['answered']} answers"
            )
            for category, loss in figures["response_loss_by_category"].items():
                lines.append(f"    {category}: {loss:.3f}")
        for sample in result["samples"]:
            lines += ["", f"Instruction: {sample['instruction']}", f"Reference: {sample['reference']}"]
            lines += [f"{name}: {sample[name]}" for name in result["metrics"]]
    if "benchmarks" in result:
        lines += ["", "lm-evaluation-harness:", *benchmark_table(result["benchmarks"], {})]
    return "\n".join(lines)


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--dataset",
    default=None,
    help="Dolly records (a file, folder or hub name); the run's eval split if it trained on them.",
)
@click.option(
    "--baseline", default=None, help="The model before training, evaluated side by side (e.g. the run's input model)."
)
@click.option(
    "--answers", "answered", type=click.IntRange(min=0), default=4, show_default=True, help="Records answered greedily."
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Longest answer.")
@click.option(
    "--columns",
    default=None,
    help="The data's columns for the dolly fields, as the trainer's --columns (default: the run's own mapping).",
)
@click.option(
    "--benchmarks",
    default=None,
    help="lm-eval tasks, comma-separated (openbookqa,arc_easy,...; dolly-v2 for the dolly-v2 card's seven).",
)
@click.option(
    "--benchmark-tasks",
    "benchmark_tasks_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A folder of lm-eval task YAML files (your own tasks) beside lm-eval's.",
)
@click.option(
    "--benchmark-limit",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many examples per task (a quick look).",
)
def main(
    model_dir: str,
    dataset: str | None,
    baseline: str | None,
    answered: int,
    max_new_tokens: int,
    columns: str | None,
    benchmarks: str | None,
    benchmark_tasks_dir: str | None,
    benchmark_limit: int | None,
) -> None:
    """Held-out response loss, stopping at ### End, answers side by side; and lm-eval benchmarks."""
    tasks = parse_tasks(benchmarks)
    if not dataset and not tasks:
        raise click.UsageError("give --dataset (held-out records), --benchmarks (lm-eval tasks), or both")
    result = evaluate(
        model_dir,
        dataset,
        baseline=baseline,
        answered=answered,
        max_new_tokens=max_new_tokens,
        columns=columns,
        benchmarks=tasks,
        benchmark_tasks_dir=benchmark_tasks_dir,
        benchmark_limit=benchmark_limit,
    )
    click.echo(report(result))


if __name__ == "__main__":
    configure_logging()
    main()
