"""Did training help? ``python -m training.evaluate MODEL_DIR --dataset FILE [--baseline BASE_MODEL]``

For each model (the trained one, and the base model before training with ``--baseline``), on held-out records:

- **held-out response loss**: mean cross-entropy per response token (the prompt is masked, as in training),
  overall and per category;
- **stops at ``### End``**: the share of greedy answers that end with the end key rather than running out of
  tokens (Dolly's users met models that never stopped);
- **answers side by side**: the instruction, the reference response, and each model's greedy answer.

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

from .collators import DataCollatorForCompletionOnlyLM
from .data import load_training_dataset
from .generate import load_model_tokenizer_for_generate
from .instruct_pipeline import InstructionTextGenerationPipeline
from .model_card import EVALUATION_NAME, read_json, write_model_card
from .preprocess import IGNORE_INDEX, preprocess_batch, preprocess_dataset
from .run_record import RUN_CONFIG_NAME

logger = logging.getLogger(__name__)


def same_data(first: str, second: str) -> bool:
    """Whether two ``--training-dataset`` values name the same data (paths compared resolved)."""
    if Path(first).exists() and Path(second).exists():
        return Path(first).resolve() == Path(second).resolve()
    return first == second


def held_out_records(model_dir: str | Path, dataset: str) -> list[dict[str, Any]]:
    """The records the run held out of ``dataset`` (its eval split), or all of them if it did not train on it."""
    from .trainer import split_dataset

    raw = load_training_dataset(dataset)
    record = read_json(Path(model_dir) / RUN_CONFIG_NAME)
    settings = record.get("settings", {})
    if not settings or not settings.get("test_size") or not same_data(settings["training_dataset"], dataset):
        logger.info("Evaluating on all %d records of %s", raw.num_rows, dataset)
        return list(raw)
    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    tokenized = preprocess_dataset(tokenizer, record["resolved"]["max_length"], seed=settings["seed"], training_dataset=raw)
    _, held_out = split_dataset(tokenized, settings["test_size"], settings["seed"])
    position = {tuple(ids): index for index, ids in enumerate(tokenizer(list(raw["text"]))["input_ids"])}
    records = [raw[position[tuple(ids)]] for ids in held_out["input_ids"]]
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
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in
                zip(tokenized["input_ids"][start : start + batch_size], tokenized["labels"][start : start + batch_size])]
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
    pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer, do_sample=False, max_new_tokens=max_new_tokens)
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
    model_dir: str | Path, dataset: str, *, baseline: str | None = None, answered: int = 4, max_new_tokens: int = 64
) -> dict[str, Any]:
    """Evaluate the trained model (and ``baseline``, before training) and record the figures beside the model."""
    model_dir = Path(model_dir)
    records = held_out_records(model_dir, dataset)
    answered = min(answered, len(records))
    models = ([baseline] if baseline else []) + [str(model_dir)]
    metrics, samples = {}, [
        {"instruction": r["instruction"], "context": r["context"], "reference": r["response"]} for r in records[:answered]
    ]
    for name in models:
        metrics[name], answers = evaluate_model(name, records, answered, max_new_tokens)
        for sample, answer in zip(samples, answers):
            sample[name] = answer["answer"]
    result = {
        "dataset": dataset, "records": len(records), "answered": answered, "max_new_tokens": max_new_tokens,
        "models": models, "metrics": metrics, "samples": samples, "date": date.today().isoformat(),
    }
    (model_dir / EVALUATION_NAME).write_text(json.dumps(result, indent=2) + "\n")
    write_model_card(model_dir)
    log_to_mlflow(model_dir, result)
    return result


def log_to_mlflow(model_dir: Path, result: dict[str, Any]) -> None:
    """Add the figures to the training's MLflow run, when it had one."""
    run_id = read_json(model_dir / RUN_CONFIG_NAME).get("resolved", {}).get("mlflow_run_id")
    if not run_id:
        return
    import mlflow

    with mlflow.start_run(run_id=run_id):
        for index, name in enumerate(result["models"]):
            prefix = "eval_trained" if name == str(model_dir) else f"eval_baseline{'' if index == 0 else index}"
            mlflow.log_metric(f"{prefix}_response_loss", result["metrics"][name]["response_loss"])
            mlflow.log_metric(f"{prefix}_stops_at_end", result["metrics"][name]["stops_at_end"])
        mlflow.log_artifact(str(model_dir / EVALUATION_NAME), artifact_path="evaluation")
        mlflow.log_artifact(str(model_dir / "README.md"), artifact_path="training")


def report(result: dict[str, Any]) -> str:
    """The figures and the answers side by side, as text."""
    lines = [f"{result['records']} held-out records of {result['dataset']}"]
    for name in result["models"]:
        figures = result["metrics"][name]
        lines.append(f"{name}: response loss {figures['response_loss']:.3f}, "
                     f"stops at ### End {figures['stops_at_end']:.0%} of {result['answered']} answers")
        for category, loss in figures["response_loss_by_category"].items():
            lines.append(f"    {category}: {loss:.3f}")
    for sample in result["samples"]:
        lines += ["", f"Instruction: {sample['instruction']}", f"Reference: {sample['reference']}"]
        lines += [f"{name}: {sample[name]}" for name in result["models"]]
    return "\n".join(lines)


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--dataset", required=True, help="Dolly records (a file, folder or hub name); the run's eval split if it trained on them.")
@click.option("--baseline", default=None, help="The model before training, evaluated side by side (e.g. the run's input model).")
@click.option("--answers", "answered", type=click.IntRange(min=0), default=4, show_default=True, help="Records answered greedily.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Longest answer.")
def main(model_dir: str, dataset: str, baseline: str | None, answered: int, max_new_tokens: int) -> None:
    """Held-out response loss, stopping at ### End, and answers side by side."""
    result = evaluate(model_dir, dataset, baseline=baseline, answered=answered, max_new_tokens=max_new_tokens)
    click.echo(report(result))


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO)
    main()
