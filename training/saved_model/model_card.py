"""A model card (``README.md`` in the Hub's form) and a training-loss plot in every output folder.

Both are made from the files beside the model: ``run_config.json`` (settings, data, versions), ``trainer_state.json``
(the loss history) and, once ``python -m training.evaluate`` has run, ``evaluation.json``. Running it again after an
evaluation brings the card up to date.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .consts import DEFAULT_TRAINING_DATASET

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
LOSS_PLOT_NAME = "training_loss.png"
EVALUATION_NAME = "evaluation.json"
MLFLOW_MODEL_RECORD = "mlflow_model.json"  # the run's MLflow model and its registered version, once logged
DATA_LICENCE = "cc-by-sa-3.0"  # databricks-dolly-15k's licence


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def plot_losses(log_history: list[dict[str, Any]], destination: Path) -> bool:
    """Training loss (and eval loss, when there is one) against the step; False when nothing was logged (or
    matplotlib is not installed: the card then goes without its plot)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: the model card has no loss plot")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train:
        return False
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*train), label="training loss")
    if evaluation:
        axes.plot(*zip(*evaluation), marker="o", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per response token")
    axes.legend()
    figure.tight_layout()
    figure.savefig(destination, dpi=100)
    plt.close(figure)
    return True


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def evaluation_section(evaluation: dict[str, Any]) -> str:
    """The evaluation figures: held-out ones with a column per model (the base model before training, then this
    one), and lm-eval's benchmarks with a row per model, as the dolly-v2 card has them."""
    if not evaluation.get("metrics") and not evaluation.get("benchmarks"):
        return (
            "Not evaluated yet. `python -m training.evaluate THIS_FOLDER --dataset DATA --baseline BASE_MODEL` "
            "adds held-out response loss, the share of answers that stop at `### End`, and sample answers here; "
            "`--benchmarks dolly-v2` adds the dolly-v2 card's lm-evaluation-harness table."
        )
    models = evaluation["models"]
    labels = {m: f"before training (`{Path(m).name}`)" for m in models[:-1]} | {
        models[-1]: "after training (this model)"
    }
    parts = []
    if evaluation.get("metrics"):
        parts.append(held_out_section(evaluation, labels))
    if evaluation.get("benchmarks"):
        benchmarks = evaluation["benchmarks"]
        metrics = ", ".join(f"{task} {benchmarks['metric'][task]}" for task in benchmarks["tasks"])
        limit = f", at most {benchmarks['limit']} examples per task" if benchmarks.get("limit") else ""
        parts.append(
            f"EleutherAI lm-evaluation-harness {benchmarks.get('lm_eval_version', '')} ({metrics}{limit}; "
            f"gmean: their geometric mean; {benchmarks['date']}):\n\n" + "\n".join(benchmark_table(benchmarks, labels))
        )
    return "\n\n".join(parts)


def held_out_section(evaluation: dict[str, Any], labels: dict[str, str]) -> str:
    metrics = evaluation["metrics"]
    models = [m for m in evaluation["models"] if m in metrics]
    rows = ["| | " + " | ".join(labels[m] for m in models) + " |", "|---|" + "---|" * len(models)]
    rows.append(
        "| held-out response loss (per token) | "
        + " | ".join(_loss(metrics[m]["response_loss"]) for m in models)
        + " |"
    )
    rows.append(
        "| answers that stop at `### End` | " + " | ".join(_share(metrics[m]["stops_at_end"]) for m in models) + " |"
    )
    categories = sorted({c for m in models for c in metrics[m]["response_loss_by_category"]})
    for category in categories:
        values = [metrics[m]["response_loss_by_category"].get(category) for m in models]
        rows.append(f"| loss, {category} | " + " | ".join(_loss(v) for v in values) + " |")
    return (
        f"On {evaluation['records']} held-out records of `{evaluation['dataset']}`; greedy answers of up to "
        f"{evaluation['max_new_tokens']} new tokens to {evaluation['answered']} of them "
        f"(`python -m training.evaluate`, {evaluation['date']}):\n\n" + "\n".join(rows)
    )


def benchmark_table(benchmarks: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The scores as the dolly-v2 card lays them out: a row per model, a column per task, then the geometric mean."""
    tasks = benchmarks["tasks"]
    rows = ["| model | " + " | ".join(tasks) + " | gmean |", "|---|" + "---|" * (len(tasks) + 1)]
    for model, scores in benchmarks["scores"].items():
        cells = [f"{scores[task]:.4f}" for task in tasks] + [f"{benchmarks['geometric_mean'][model]:.4f}"]
        rows.append(f"| {labels.get(model, model)} | " + " | ".join(cells) + " |")
    return rows


def serving_section(logged: dict[str, Any]) -> list[str]:
    """How to serve the model: the MLflow model (and its registered version) once logged, and chat servers."""
    lines = []
    if logged:
        registered = (
            f" Registered as **{logged['registered_model']}** version **{logged['version']}** "
            f"(`models:/{logged['registered_model']}/{logged['version']}`)."
            if logged.get("registered_model")
            else ""
        )
        lines += [
            f"The training run logged this model to MLflow as `{logged['model_uri']}` (run `{logged['run_id']}`)."
            + registered,
            'It answers OpenAI-style chat requests (`{"messages": [{"role": "user", "content": ...}], '
            '"max_tokens": 256}`, one `chat.completion` each; several requests in one call are generated as one '
            "batch) and Dolly's table of `instruction` and `context` (a response string per row): "
            f"`mlflow models serve -m {logged['model_uri']}`.",
            "",
        ]
    lines += [
        "The folder is a standard Hugging Face model folder whose tokenizer carries Dolly's prompt format as its chat "
        "template (`chat_template.jinja` and `tokenizer_config.json`) and whose `generation_config.json` stops at "
        "`### End`, so chat servers (vLLM, TGI) prompt it as it was trained.",
    ]
    return lines


def stop_rate_row(log_history: list[dict[str, Any]], answers: int | None, cap: int | None) -> str:
    """The last evaluation's stop rate: the share of its held-out sample answers that ended at ``### End``."""
    rates = [(entry["step"], entry["eval_stop_rate"]) for entry in log_history if "eval_stop_rate" in entry]
    if not rates:
        return "| answers that stop at `### End`, last evaluation | - |"
    step, rate = rates[-1]
    shown = "none could stop within the cap" if rate != rate else f"{rate:.0%}"  # NaN: every reference was longer
    return (
        f"| answers that stop at `### End`, last evaluation | {shown} (step {step}; {answers} held-out instructions, "
        f"greedy with the pipeline's default answer repetition penalty, at most {cap} new tokens; answers whose "
        "reference is longer than that are not counted) |"
    )


def write_model_card(folder: str | Path, published_as: str | Path | None = None) -> Path:
    """Write ``README.md`` (and ``training_loss.png``) into a model folder from the files beside the model.

    ``published_as``: where the folder will be (a staging folder is written before it is moved into place).
    """
    folder = Path(folder)
    location = Path(published_as or folder)
    record = read_json(folder / "run_config.json")
    state = read_json(folder / "trainer_state.json")
    evaluation = read_json(folder / EVALUATION_NAME)
    logged = read_json(folder / MLFLOW_MODEL_RECORD)
    settings = record.get("settings", {})
    base_model = settings.get("input_model", "unknown")
    dataset = settings.get("training_dataset", DEFAULT_TRAINING_DATASET)
    has_plot = plot_losses(state.get("log_history", []), folder / LOSS_PLOT_NAME)
    data = ModelCardData(
        language="en",
        license=DATA_LICENCE,
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model if "/" in base_model and not Path(base_model).exists() else None,
        datasets=[dataset] if dataset == DEFAULT_TRAINING_DATASET else None,
        tags=["dolly", "instruction-tuning"],
    )
    resolved, data_counts = record.get("resolved", {}), record.get("data", {})
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in state.get("log_history", []) if "eval_loss" in entry]
    lines = [
        f"# {location.name}",
        "",
        f"`{base_model}` instruction-tuned on `{dataset}` with the Dolly prompt template "
        "(instruction, optional context, `### Response:`, answer, `### End`).",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| records | {data_counts.get('train_records', '?')} for training, {data_counts.get('eval_records', '?')} held out "
        f"({data_counts.get('records', '?')} read, {data_counts.get('within_max_length', '?')} within the max length) |",
        f"| steps | {state.get('global_step', '?')} (epochs {settings.get('epochs', '?')}, max steps {settings.get('max_steps', '?')}) |",
        f"| batch | {settings.get('per_device_train_batch_size', '?')} per device x {resolved.get('world_size', '?')} "
        f"ranks x {settings.get('gradient_accumulation_steps', '?')} accumulation |",
        f"| learning rate | {settings.get('lr', '?')}, warmup {settings.get('warmup_steps') or 0} steps |",
        f"| precision, max length | {resolved.get('precision', '?')}, {resolved.get('max_length', '?')} tokens |",
        f"| packed rows attend through | {resolved.get('attention') or 'no packing (padded batches)'} |",
        f"| stored | `{settings.get('local_output_dir', location)}`"
        + (f", copied to `{settings['dbfs_output_dir']}`" if settings.get("dbfs_output_dir") else "")
        + " |",
        f"| method | {'LoRA r=' + str(settings['lora_r']) if settings.get('lora_r') else 'full fine-tuning'}"
        f"{', DeepSpeed ' + Path(settings['deepspeed']).name if settings.get('deepspeed') else ''} |",
        f"| final training loss | {losses[-1]:.3f} |" if losses else "| final training loss | - |",
        f"| final eval loss | {eval_losses[-1]:.3f} |" if eval_losses else "| final eval loss | - |",
        stop_rate_row(state.get("log_history", []), settings.get("eval_answers"), settings.get("eval_answer_tokens")),
        "",
    ]
    if has_plot:
        lines += [f"![training loss]({LOSS_PLOT_NAME})", ""]
    lines += [
        "Every setting, the library versions and the DeepSpeed config as used are in `run_config.json`; "
        "`python -m training.trainer --config run_config.json --local-output-dir NEW` trains it again.",
        "",
        "## Evaluation",
        "",
        evaluation_section(evaluation),
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generate = pipeline(model="{location}", trust_remote_code=True)  # the instruction pipeline shipped here',
        'print(generate("Explain to me the difference between nuclear fission and fusion.")[0]["generated_text"])',
        "```",
        "",
        "`trust_remote_code=True` runs `instruct_pipeline.py` from this folder; without it, "
        "`training.generate.load_model_tokenizer_for_generate` and `generate_response` from the training repository "
        "do the same.",
        "",
        "## Serving",
        "",
        *serving_section(logged),
        "",
        "## Licence",
        "",
        "The training data, databricks-dolly-15k, is CC BY-SA 3.0 (Databricks, Inc.); the base model's own licence "
        "applies to its weights.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    card.save(folder / CARD_NAME)
    return folder / CARD_NAME
