"""Does the recipe teach the Dolly format and improve the model? Measured before and after fine-tuning.

    python -m bench.quality [--input-model embedded|PATH] [--training-dataset FILE] [--quick]

A fixed, seeded set of real dolly records is held out. On it, the untuned and the tuned model are measured:
- response-only loss per token (the training masking and tokenization), overall and per category;
- stop rate: the share of greedy generations (at most 128 new tokens, and 256) through our pipeline, with its
  default decoding (the answer repetition penalty), that end with ``### End``. The untuned model is run with its own
  tokenizer, where ``### End`` is ordinary text found by the pipeline's text fallback; the tuned model with the
  trained tokenizer, where it is the special token;
- a few generations side by side;
- the answers that did not stop within 256 tokens, and why (:func:`run_on_kind`); other decodings on request
  (``--generation-variants``, e.g. ``answer_repetition_penalty=1.0`` for Dolly's);
- what the training records teach about ending (:func:`what_records_teach`).
Writes bench/results/quality.json and a loss-curve PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import (
    RESULTS_DIR,
    default_dataset,
    pyplot,
    response_loss,
    result_header,
    save_figure,
    split_records,
    tokenize_records,
    write_json,
)
from bench.throughput import resolve_model
from training.consts import END_KEY, RESPONSE_KEY_NL
from training.generate import InstructionTextGenerationPipeline, load_model_tokenizer_for_generate
from training.logs import configure_logging
from training.preprocess import IGNORE_INDEX
from training.prompts import format_training_text
from training.rank.modeling import get_model_tokenizer, load_tokenizer
from training.saved_model.instruct_pipeline import ANSWER_REPETITION_PENALTY
from training.trainer import TRAINING_LOG_NAME, train

logger = logging.getLogger(__name__)

# Dolly's pipeline default for max_new_tokens: a second stop rate for answers that are long by nature.
LONG_BUDGET = 256


def generations(
    model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 8, **generate_kwargs: Any
) -> list[dict]:
    """Greedy answers through the pipeline, with why each one stopped."""
    generator = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)
    inputs = [{"instruction": r["instruction"], "context": r["context"]} for r in records]
    outputs = generator(
        inputs,
        batch_size=batch_size,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        return_finish_reason=True,
        **generate_kwargs,
    )
    return [{"text": out[0]["generated_text"], "finish_reason": out[0]["finish_reason"]} for out in outputs]


def run_on_kind(answer: dict) -> str | None:
    """Why an answer did not stop at ``### End`` (None when it did): ``eos`` (it ended with EOS instead),
    ``new instruction`` (it began another prompt block), ``repeats`` (its end is a loop: a stretch of text, digits
    aside, repeated at least three times in a row) or ``long`` (it ran on to the cap without repeating)."""
    if answer["finish_reason"] == "end_key":
        return None
    if answer["finish_reason"] == "eos":
        return "eos"
    text = answer["text"]
    if "### Instruction" in text or "Instruction:" in text:
        return "new instruction"
    flat = re.sub(r"\d+", "#", " ".join(text.split()))
    tail = flat[-240:]
    for period in range(2, len(tail) // 3 + 1):
        if tail[-period:] == tail[-2 * period : -period] == tail[-3 * period : -2 * period]:
            return "repeats"
    sentences = [part.strip() for part in re.split(r"(?<=[.!?\n])\s", flat) if len(part.split()) >= 4]
    if any(sentences.count(sentence) >= 3 for sentence in set(sentences)):
        return "repeats"  # the same sentence three times or more, the answer cut off inside the next
    return "long"


def stop_rate(answers: list[dict]) -> float:
    return sum(a["finish_reason"] == "end_key" for a in answers) / len(answers)


def measure(model, loss_tokenizer, generation_tokenizer, eval_tok, stop_records, max_new_tokens) -> dict[str, Any]:
    losses = response_loss(model, loss_tokenizer, eval_tok)
    answers = generations(model, generation_tokenizer, stop_records, max_new_tokens)
    return {"loss": losses, "answers": answers, "stop_rate": stop_rate(answers)}


def draw_loss_curve(log_history: list[dict], path: Path, title: str) -> None:
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    fig, axis = pyplot().subplots(figsize=(6, 3.4))
    axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (per response token)")
    save_figure(fig, path, title)


def run_on_answers(records: list[dict], answers: list[dict]) -> list[dict]:
    """The answers that did not stop, with their instruction and why (:func:`run_on_kind`)."""
    return [
        {"instruction": r["instruction"], "category": r.get("category"), "kind": run_on_kind(a), "answer": a["text"]}
        for r, a in zip(records, answers)
        if run_on_kind(a) is not None
    ]


def what_records_teach(records: list[dict], tokenizer, max_length: int) -> dict[str, Any]:
    """What the training records teach about ending: the records ``max_length`` drops (by category, with their
    response lengths), whether every kept record's labels end with ``### End`` (and never hold EOS), and the share of
    the loss the end key gets (per-token normalisation weighs every response token the same, packed or not)."""
    end_id = tokenizer.convert_tokens_to_ids(END_KEY)
    all_tokenized = tokenize_records(records, tokenizer, max_length=1 << 30)
    kept, dropped = [], []
    for record, tokenized in zip(records, all_tokenized):
        response = [label for label in tokenized["labels"] if label != IGNORE_INDEX]
        (kept if len(tokenized["input_ids"]) <= max_length else dropped).append((record, response))
    response_tokens = sum(len(response) for _, response in kept)
    end_labels = sum(response.count(end_id) for _, response in kept)
    lengths = sorted(len(response) for _, response in kept)
    return {
        "max_length": max_length,
        "records": len(records),
        "dropped": len(dropped),
        "dropped_by_category": dict(Counter(r.get("category") or "unknown" for r, _ in dropped)),
        "dropped_response_tokens": sorted(len(response) for _, response in dropped),
        "kept_labels_end_with_end_key": sum(bool(response) and response[-1] == end_id for _, response in kept),
        "kept_labels_with_eos": sum(tokenizer.eos_token_id in response for _, response in kept),
        "end_key_loss_share": end_labels / response_tokens,
        "median_response_tokens": lengths[len(lengths) // 2],
        "longest_kept_response_tokens": lengths[-1],
    }


def parse_variants(text: str) -> dict[str, dict[str, Any]]:
    """``'repetition_penalty=1.1;...'`` as {name: generate settings}; each value read as JSON (a number, true...)."""
    variants = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        settings = {}
        for pair in item.split(","):
            key, value = pair.split("=", 1)
            settings[key.strip()] = json.loads(value)
        variants[item] = settings
    return variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-model", default="embedded")
    parser.add_argument("--training-dataset", default=default_dataset())
    parser.add_argument("--eval-records", type=int, default=80)
    parser.add_argument("--stop-records", type=int, default=40, help="held-out instructions for the stop rate")
    parser.add_argument("--train-records", type=int, default=600)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--side-by-side", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to measure and generate"
    )
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (default: fp32, as on CPU)")
    parser.add_argument(
        "--generation-variants",
        default="",
        help="also answer the stop records (at 256 new tokens) with these generate settings, ';'-separated, "
        "e.g. 'repetition_penalty=1.1;repetition_penalty=1.2'",
    )
    parser.add_argument("--keep-model", type=Path, default=None, help="also save the tuned model here, to study")
    parser.add_argument(
        "--tuned-model",
        type=Path,
        default=None,
        help="measure this model (one --keep-model saved, trained with the same options) instead of training one: "
        "to study decodings without training again",
    )
    parser.add_argument("--quick", action="store_true", help="a few records and steps: a smoke check, not a result")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quality.json")
    options = parser.parse_args(argv)
    if options.quick:
        options.eval_records, options.stop_records, options.train_records = 8, 4, 24
        options.max_steps, options.max_new_tokens, options.side_by_side, options.warmup_steps = 3, 16, 2, 0
    return options


def fine_tune(options: argparse.Namespace, model_dir: str, train_records: list[dict], scratch: Path) -> Path:
    """The benchmark's recipe: fine-tune ``model_dir`` on ``train_records``; the finished model's folder."""
    data_file = scratch / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    output_dir = train(
        input_model=model_dir,
        local_output_dir=str(scratch / "model"),
        training_dataset=str(data_file),
        epochs=options.epochs,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        test_size=0,
        lr=options.lr,
        warmup_steps=options.warmup_steps,
        max_length=options.max_length,
        save_steps=100_000,
        logging_steps=5 if not options.quick else 1,
        seed=options.seed,
        gradient_checkpointing=False,
        bf16=options.bf16,
        mlflow=False,  # a benchmark, not a run to track
    )
    if options.keep_model:
        shutil.copytree(output_dir, options.keep_model, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    return output_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    options = parse_args(argv)
    started = time.perf_counter()
    model_dir = resolve_model(options.input_model)
    train_records, held_out = split_records(
        options.training_dataset, options.eval_records, options.train_records, options.seed
    )
    stop_records = held_out[: options.stop_records]
    trained_tokenizer = load_tokenizer(model_dir)
    eval_tok = tokenize_records(held_out, trained_tokenizer, options.max_length)

    # Before: losses on the training tokenization; generation with the base model's own tokenizer.
    torch.manual_seed(options.seed)
    base_model, base_tokenizer = get_model_tokenizer(model_dir, dtype=torch.float32)
    base_model.to(options.device)
    plain_tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    plain_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(options.device)
    before = {
        "loss": response_loss(base_model, base_tokenizer, eval_tok),
        "answers": generations(plain_model, plain_tokenizer, stop_records, options.max_new_tokens),
    }
    before["stop_rate"] = stop_rate(before["answers"])
    del base_model, plain_model

    with tempfile.TemporaryDirectory() as scratch:
        output_dir = options.tuned_model or fine_tune(options, model_dir, train_records, Path(scratch))
        log_history = json.loads((output_dir / TRAINING_LOG_NAME).read_text())["log_history"]
        steps = max(entry["step"] for entry in log_history)
        tuned_model, tuned_tokenizer = load_model_tokenizer_for_generate(
            str(output_dir), dtype=torch.float32, device_map=options.device
        )
        after = measure(tuned_model, tuned_tokenizer, tuned_tokenizer, eval_tok, stop_records, options.max_new_tokens)
        # The same instructions with the pipeline's default budget, for answers that are long by nature.
        long_budget = generations(tuned_model, tuned_tokenizer, stop_records, LONG_BUDGET)
        variants = {
            name: generations(tuned_model, tuned_tokenizer, stop_records, LONG_BUDGET, **settings)
            for name, settings in parse_variants(options.generation_variants).items()
        }

    categories = sorted(k for k in before["loss"] if k != "overall")
    reference_lengths = [
        len(trained_tokenizer(format_training_text("", r["response"]).split(RESPONSE_KEY_NL, 1)[1])["input_ids"])
        for r in stop_records
    ]
    payload: dict[str, Any] = {
        **result_header("bench.quality", argv),
        "model": options.input_model,
        "training_dataset": Path(options.training_dataset).name,
        "quick": options.quick,
        "tuned_model": str(options.tuned_model) if options.tuned_model else None,  # None: trained by this run
        "train_records": len(train_records),
        "eval_records": len(eval_tok),
        "stop_records": len(stop_records),
        "answer_repetition_penalty": ANSWER_REPETITION_PENALTY,
        "training_records_teach": what_records_teach(train_records, trained_tokenizer, options.max_length),
        "steps": steps,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "eval_loss_before": before["loss"]["overall"]["loss"],
        "eval_loss_after": after["loss"]["overall"]["loss"],
        "eval_loss_change": after["loss"]["overall"]["loss"] / before["loss"]["overall"]["loss"] - 1,
        "stop_rate_before": before["stop_rate"],
        "stop_rate_after": after["stop_rate"],
        "finish_reasons_after": {
            r: sum(a["finish_reason"] == r for a in after["answers"]) for r in ("end_key", "eos", "length")
        },
        # How many human reference answers (with "### End") would themselves fit in the budget.
        "reference_fits_rate": sum(n <= options.max_new_tokens for n in reference_lengths) / len(stop_records),
        f"stop_rate_after_{LONG_BUDGET}_tokens": stop_rate(long_budget),
        "stop_details_after": [
            {
                "category": r.get("category") or "unknown",
                "reference_tokens": n,
                "finish_reason": a["finish_reason"],
                f"finish_reason_{LONG_BUDGET}_tokens": b["finish_reason"],
            }
            for r, n, a, b in zip(stop_records, reference_lengths, after["answers"], long_budget)
        ],
        # The answers that did not stop within the pipeline's budget, whole, with why (run_on_kind).
        f"run_on_after_{LONG_BUDGET}_tokens": run_on_answers(stop_records, long_budget),
        "generation_variants": {
            name: {
                f"stop_rate_{LONG_BUDGET}_tokens": stop_rate(answers),
                "run_on": run_on_answers(stop_records, answers),
            }
            for name, answers in variants.items()
        },
        "per_category": {
            c: {
                "records_tokens": before["loss"][c]["tokens"],
                "loss_before": before["loss"][c]["loss"],
                "loss_after": after["loss"][c]["loss"],
            }
            for c in categories
        },
        "side_by_side": [
            {"instruction": r["instruction"], "context": r["context"][:200], "before": b["text"], "after": a["text"]}
            for r, b, a in list(zip(stop_records, before["answers"], after["answers"]))[: options.side_by_side]
        ],
        "training_log": [{k: e[k] for k in ("step", "loss") if k in e} for e in log_history if "loss" in e],
        "seconds": time.perf_counter() - started,
    }
    write_json(options.out, payload)
    draw_loss_curve(
        log_history,
        options.out.with_name(options.out.stem + "_loss.png"),
        f"{options.input_model}: {len(train_records)} records, lr {options.lr}",
    )
    summary = {
        k: payload[k]
        for k in (
            "eval_loss_before",
            "eval_loss_after",
            "eval_loss_change",
            "stop_rate_before",
            "stop_rate_after",
            "steps",
            "seconds",
        )
    }
    print(json.dumps(summary, indent=2))
    return payload


if __name__ == "__main__":
    main()
