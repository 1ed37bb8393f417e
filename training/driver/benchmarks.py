"""The dolly-v2 benchmark table: EleutherAI's lm-evaluation-harness (the ``lm-eval`` package) on the trained model
and the model it started from.

The dolly-v2 model cards report openbookqa, arc_easy, winogrande, hellaswag, arc_challenge, piqa and boolq, and
their geometric mean. Each task's score is lm-eval's length-normalised accuracy (``acc_norm``) where the task has
one, else its accuracy (``acc``): the figures on the dolly-v2 cards match that reading (pythia-2.8b's hellaswag
0.59 is its ``acc_norm``; winogrande and boolq have only ``acc``). lm-eval downloads those tasks' data from the
Hugging Face hub; a task of your own (lm-eval's YAML task format, in a folder given as ``tasks_dir``) runs offline.
"""

from __future__ import annotations

import logging
import math
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DOLLY_V2_TASKS = ("openbookqa", "arc_easy", "winogrande", "hellaswag", "arc_challenge", "piqa", "boolq")
METRIC_PREFERENCE = ("acc_norm", "acc")


def parse_tasks(text: str | None) -> list[str]:
    """``openbookqa,arc_easy`` as a list; ``dolly-v2`` for the dolly-v2 card's seven."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return [task for name in names for task in (DOLLY_V2_TASKS if name == "dolly-v2" else (name,))]


def model_args(model: str, dtype: str) -> str:
    """lm-eval's ``model_args`` for a model folder or hub name (an adapter-only output loads its base with it)."""
    from ..rank.lora import adapter_base_model, is_adapter_dir

    if is_adapter_dir(model):
        return f"pretrained={adapter_base_model(model)},peft={model},dtype={dtype}"
    return f"pretrained={model},dtype={dtype}"


def task_score(results: dict[str, Any]) -> tuple[str, float]:
    """The metric a task is reported by (``acc_norm`` where it has one, else ``acc``) and its value."""
    for metric in METRIC_PREFERENCE:
        key = f"{metric},none"
        if key in results:
            return metric, float(results[key])
    raise KeyError(f"no {' or '.join(METRIC_PREFERENCE)} in lm-eval's results ({', '.join(results)})")


def geometric_mean(values: list[float]) -> float:
    if not values or any(value <= 0 for value in values):
        return 0.0
    return math.exp(sum(math.log(value) for value in values) / len(values))


def run_benchmarks(
    models: list[str],
    tasks: list[str],
    *,
    tasks_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Each model's score on each task (and their geometric mean), through ``lm_eval.simple_evaluate``."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    task_manager = TaskManager(include_path=str(Path(tasks_dir).resolve()) if tasks_dir else None)
    scores: dict[str, dict[str, float]] = {}
    metrics: dict[str, str] = {}
    for model in models:
        logger.info("lm-eval: %s on %s", model, ", ".join(tasks))
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args(model, dtype),
            tasks=tasks,
            task_manager=task_manager,
            batch_size=batch_size,
            device=device,
            limit=limit,
        )
        scores[model] = {}
        for task in tasks:
            metrics[task], scores[model][task] = task_score(output["results"][task])
    return {
        "tasks": tasks,
        "metric": metrics,
        "scores": scores,
        "geometric_mean": {model: geometric_mean(list(values.values())) for model, values in scores.items()},
        "limit": limit,
        "lm_eval_version": metadata.version("lm_eval"),
    }
