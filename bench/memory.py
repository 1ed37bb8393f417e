"""Memory and speed of full fine-tuning versus LoRA versus QLoRA, on the same model and data.

    python -m bench.memory [--model embedded|pythia-410m|PATH] [--train-records 48]

Each arm trains in its own process (so its peak memory is its own) with this project's packed batches:
- full: every weight trains (AdamW states for all of them);
- lora: rank-16 adapters on the attention and MLP projections, plus the new tokens' rows (no dropout, the
  trainer's default; ``--lora-dropout`` to compare);
- qlora: the same adapters on a base loaded in 4-bit NF4 through bitsandbytes (8-bit where 4-bit is unavailable).
Writes bench/results/memory.json with ``peak_memory_bytes`` and ``tokens_per_second`` per arm. On CPU, peak memory
is the process's maximum resident set; on a GPU, torch's peak allocated memory.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS_DIR,
    as_dataset,
    default_dataset,
    peak_memory_bytes,
    result_header,
    run_arms,
    split_records,
    timed_training,
    tokenize_records,
    write_json,
)
from bench.throughput import CountingCollator, resolve_model, training_arguments
from training.logs import configure_logging
from training.rank.lora import LoraSettings, apply_lora
from training.rank.modeling import get_model_tokenizer
from training.rank.packing import packing_collator
from training.rank.quantization import quantization_config

logger = logging.getLogger(__name__)

ARMS = ("full", "lora", "qlora")


def load_arm_model(arm: str, model_dir: str, options: argparse.Namespace):
    dtype = torch.bfloat16 if options.bf16 and torch.cuda.is_available() else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if arm == "qlora":
        kwargs["quantization_config"] = quantization_config(
            load_in_4bit=not options.qlora_8bit, load_in_8bit=options.qlora_8bit
        )
        kwargs["device_map"] = {"": 0 if torch.cuda.is_available() else "cpu"}
    model, tokenizer = get_model_tokenizer(model_dir, **kwargs)
    if torch.cuda.is_available() and arm != "qlora":
        model.cuda()
    if arm != "full":
        settings = LoraSettings(r=options.lora_r, alpha=2 * options.lora_r, dropout=options.lora_dropout)
        model = apply_lora(model, tokenizer, settings, quantized=arm == "qlora")
    return model, tokenizer


def run_arm(arm: str, options: argparse.Namespace) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(options.seed)
    model, tokenizer = load_arm_model(arm, resolve_model(options.model), options)
    train_records, _ = split_records(options.training_dataset, 1, options.train_records, options.seed)
    dataset = as_dataset(tokenize_records(train_records, tokenizer, options.max_length))
    with tempfile.TemporaryDirectory() as scratch:
        counter = CountingCollator(packing_collator(model, tokenizer))
        arguments = TrainingArguments(**training_arguments(scratch, options, batch_size=options.batch_size))
        trainer = Trainer(
            model=model, args=arguments, train_dataset=dataset, data_collator=counter, processing_class=tokenizer
        )
        seconds = timed_training(trainer)
    trainable, total = (
        model.get_nb_trainable_parameters()
        if hasattr(model, "get_nb_trainable_parameters")
        else (model.num_parameters(), model.num_parameters())
    )
    return {
        "arm": arm,
        "peak_memory_bytes": peak_memory_bytes(),
        "tokens_per_second": counter.useful / seconds,
        "useful_tokens": counter.useful,
        "seconds": seconds,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "quantization": ("8-bit" if options.qlora_8bit else "4-bit NF4") if arm == "qlora" else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--training-dataset", default=default_dataset())
    parser.add_argument("--train-records", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--qlora-8bit", action="store_true", help="quantize the QLoRA base to 8-bit instead of 4-bit")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true", help="bf16 on a GPU (ignored on CPU)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "memory.json")
    parser.add_argument("--run-arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--arm-result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    options = parse_args(argv)
    if options.run_arm:
        write_json(options.arm_result, run_arm(options.run_arm, options))
        return {}
    resolve_model(options.model)
    forwarded, results = run_arms("bench.memory", options.arms.split(","), argv)
    payload = {
        **result_header("bench.memory", forwarded),
        "model": options.model,
        "train_records": options.train_records,
        "batch_size": options.batch_size,
        **results,
    }
    if "full" in results and "lora" in results:
        payload["lora_peak_vs_full"] = results["lora"]["peak_memory_bytes"] / results["full"]["peak_memory_bytes"]
    write_json(options.out, payload)
    return payload


if __name__ == "__main__":
    main()
