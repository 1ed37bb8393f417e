"""Training throughput: Dolly's original recipe, TRL's SFTTrainer with packing, and ours, on the same model and data.

    python -m bench.throughput [--model embedded|pythia-410m|PATH] [--train-records 120] [--batch-size 6]

Each arm trains one epoch on the same real dolly records (same tokens, same learning rate) in its own process, so
peak memory is its own. Recorded per arm: useful tokens per second (tokens that are not padding), the padding
fraction, peak memory, and the held-out response loss after training (measured the same way for every arm).
Results go to bench/results/throughput.json and a bar chart next to it.

- original: pad each random batch to its longest record (multiple of 8), Dolly's collator and sampler.
- trl: trl.SFTTrainer with packing (best-fit decreasing, padding-free) and completion-only loss.
- ours: this project's padding-free packing, one row per batch, loss per response token over the step.
- ours_compiled (only when asked for, ``--arms ours,ours_compiled``): ours with the Trainer's ``torch_compile``
  (inductor, shapes marked dynamic after the first recompile). Its time includes compiling; each arm also records
  its optimizer steps' wall-clock times, so the steady state can be compared too.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bench.common import (
    RESULTS_DIR,
    as_dataset,
    default_dataset,
    peak_memory_bytes,
    pyplot,
    response_loss,
    result_header,
    run_arms,
    save_figure,
    split_records,
    timed_training,
    tokenize_records,
    write_json,
)
from training.driver.embedded import EmbeddedModelMissing, cache_root, embedded_model_dir
from training.logs import configure_logging
from training.rank.collators import DataCollatorForCompletionOnlyLM
from training.rank.modeling import get_model_tokenizer
from training.rank.packing import packed_kernel, packing_collator, plain_attention

logger = logging.getLogger(__name__)

ARMS = ("original", "trl", "ours")
OPTIONAL_ARMS = ("ours_compiled",)
# Dense bf16 peak FLOP/s, for model FLOPs utilisation on GPUs.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12}


class CountingCollator:
    """Wraps a collator and counts the token positions it hands the model, how many are real, and the largest batch."""

    def __init__(self, inner):
        self.inner = inner
        self.positions = 0
        self.useful = 0
        self.largest_batch = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.positions += batch["input_ids"].numel()
        self.largest_batch = max(self.largest_batch, batch["input_ids"].numel())
        mask = batch.get("attention_mask")
        self.useful += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def resolve_model(name: str) -> str:
    """``embedded`` (SmolLM2-135M), ``pythia-<size>`` (random weights, SmolLM2's tokenizer where the embedded package
    is installed), or a path or hub name."""
    if name == "embedded":
        return str(embedded_model_dir())
    if name.startswith("pythia-"):
        from transformers import AutoTokenizer

        from bench.synthetic import build_pythia_model, record_texts, train_bpe_tokenizer

        target = cache_root() / f"random-{name}"
        if not (target / "config.json").exists():
            try:
                tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
            except EmbeddedModelMissing:  # a bare GPU machine: a tokenizer trained on the records here
                tokenizer = train_bpe_tokenizer(record_texts(default_dataset()), vocab_size=8192)
            build_pythia_model(target, shape=name.removeprefix("pythia-"), tokenizer=tokenizer)
        return str(target)
    return name


class StepClock(TrainerCallback):
    """The wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def training_arguments(output_dir: str, options: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    """The Trainer settings every arm shares (TRL's SFTConfig takes them too)."""
    use_bf16 = options.bf16 and torch.cuda.is_available()
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=options.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        seed=options.seed,
        data_seed=options.seed,
        bf16=use_bf16,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,
    )


def run_arm(arm: str, options: argparse.Namespace) -> dict[str, Any]:
    """Train one arm and measure it (runs in its own process)."""
    model_dir = resolve_model(options.model)
    torch.manual_seed(options.seed)
    dtype = torch.bfloat16 if options.bf16 and torch.cuda.is_available() else torch.float32
    model, tokenizer = get_model_tokenizer(model_dir, dtype=dtype, attn_implementation=options.attn_implementation)
    if torch.cuda.is_available():
        model.cuda()
    train_records, eval_records = split_records(
        options.training_dataset, options.eval_records, options.train_records, options.seed
    )
    train_tok = tokenize_records(train_records, tokenizer, options.max_length)
    eval_tok = tokenize_records(eval_records, tokenizer, options.max_length)
    record_tokens = sum(len(r["input_ids"]) for r in train_tok)
    steps = -(-len(train_tok) // options.batch_size)

    def held_out_loss() -> float | None:
        with plain_attention(model):  # padded batches: the model's own attention, as a saved model has
            return response_loss(model, tokenizer, eval_tok)["overall"]["loss"] if eval_tok else None

    eval_loss_before = held_out_loss()

    with tempfile.TemporaryDirectory() as scratch:
        if arm == "trl":
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            dataset = Dataset.from_list(
                [
                    {"input_ids": r["input_ids"], "completion_mask": [int(label != -100) for label in r["labels"]]}
                    for r in train_tok
                ]
            )
            kwargs = training_arguments(scratch, options, batch_size=1)
            # Rows as long as the tokens one of our batches holds on average, so both take similar optimizer steps.
            config = SFTConfig(**kwargs, packing=True, completion_only_loss=True, max_length=-(-record_tokens // steps))
            trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        else:
            from transformers import Trainer, TrainingArguments

            kwargs = training_arguments(scratch, options, batch_size=options.batch_size)
            kwargs["torch_compile"] = arm == "ours_compiled"
            if arm == "original":
                inner = DataCollatorForCompletionOnlyLM(tokenizer=tokenizer, pad_to_multiple_of=8)
            else:
                inner = packing_collator(model, tokenizer)  # exactly what the trainer uses
            trainer = Trainer(
                model=model,
                args=TrainingArguments(**kwargs),
                train_dataset=as_dataset(train_tok),
                data_collator=inner,
                processing_class=tokenizer,
            )
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        clock = StepClock()
        trainer.add_callback(clock)
        started = time.perf_counter()
        seconds = timed_training(trainer)
    peak = peak_memory_bytes()
    tokens_per_second = counter.useful / seconds
    result = {
        "arm": arm,
        "train_records": len(train_tok),
        "useful_tokens": counter.useful,
        "record_tokens": record_tokens,
        "processed_positions": counter.positions,
        "largest_batch_positions": counter.largest_batch,
        "padding_fraction": 1 - counter.useful / counter.positions,
        "optimizer_steps": trainer.state.global_step,
        "seconds": seconds,
        "step_seconds": [end - start for start, end in zip([started, *clock.ends], clock.ends)],
        "useful_tokens_per_second": tokens_per_second,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "process max RSS",
        "eval_loss_before": eval_loss_before,
        "eval_loss": held_out_loss(),
        "eval_records": len(eval_tok),
        "flops_per_token": 6 * model.num_parameters(),
    }
    if arm.startswith("ours") and (kernel := packed_kernel(model)) is not None:
        result["attention"] = kernel.describe()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak_flops = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        result["mfu"] = result["flops_per_token"] * tokens_per_second / peak_flops if peak_flops else None
    return result


def compile_comparison(eager: dict[str, Any], compiled: dict[str, Any], warmup_steps: int = 3) -> dict[str, Any]:
    """Compiled over eager: the whole training (compiling included) and the median step after ``warmup_steps``."""

    def steady(result: dict[str, Any]) -> float:
        return statistics.median(result["step_seconds"][warmup_steps:])

    return {
        "whole_training_speedup": compiled["useful_tokens_per_second"] / eager["useful_tokens_per_second"],
        "steady_step_speedup": steady(eager) / steady(compiled),
        "steady_step_seconds": {"ours": steady(eager), "ours_compiled": steady(compiled)},
        "first_step_seconds": {"ours": eager["step_seconds"][0], "ours_compiled": compiled["step_seconds"][0]},
        "warmup_steps_left_out": warmup_steps,
        "eval_loss_difference": compiled["eval_loss"] - eager["eval_loss"],
    }


def draw_chart(results: dict[str, dict], path: Path, title: str) -> None:
    arms = list(results)
    fig, (speed, padding) = pyplot().subplots(1, 2, figsize=(9, 3.6))
    speed.bar(arms, [results[a]["useful_tokens_per_second"] for a in arms], color=["#999999", "#4c72b0", "#dd8452"])
    speed.set_title("useful tokens / second")
    padding.bar(arms, [100 * results[a]["padding_fraction"] for a in arms], color=["#999999", "#4c72b0", "#dd8452"])
    padding.set_title("padding (% of positions)")
    save_figure(fig, path, title)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--training-dataset", default=default_dataset())
    parser.add_argument("--train-records", type=int, default=120, help="0: every record not held out")
    parser.add_argument("--eval-records", type=int, default=40, help="held out for the loss after training (0: none)")
    parser.add_argument("--batch-size", type=int, default=6, help="records per optimizer step (Dolly's A100 value)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true", help="bf16 on a GPU (ignored on CPU)")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS + OPTIONAL_ARMS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "throughput.json")
    parser.add_argument("--run-arm", choices=ARMS + OPTIONAL_ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--arm-result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    options = parse_args(argv)
    if options.run_arm:
        write_json(options.arm_result, run_arm(options.run_arm, options))
        return {}
    resolve_model(options.model)  # build or convert once, before the arms start
    forwarded, results = run_arms("bench.throughput", options.arms.split(","), argv)
    payload: dict[str, Any] = {
        **result_header("bench.throughput", forwarded),
        "model": options.model,
        "training_dataset": Path(options.training_dataset).name,
        "batch_size": options.batch_size,
        "arms": results,
    }
    ours = results.get("ours", {}).get("useful_tokens_per_second")
    for baseline in ("original", "trl"):
        if ours and baseline in results:
            payload[f"ratio_vs_{baseline}"] = ours / results[baseline]["useful_tokens_per_second"]
    if "ours" in results and "original" in results and results["original"]["eval_loss"]:
        payload["eval_loss_ours_vs_original"] = results["ours"]["eval_loss"] / results["original"]["eval_loss"] - 1
    if "ours" in results and "ours_compiled" in results:
        payload["compile"] = compile_comparison(results["ours"], results["ours_compiled"])
    payload["eval_loss"] = {arm: r["eval_loss"] for arm, r in results.items()}
    write_json(options.out, payload)
    draw_chart(results, options.out.with_suffix(".png"), f"{options.model}, {payload['machine']}")
    print(json.dumps({k: v for k, v in payload.items() if k != "arms"}, indent=2))
    return payload


if __name__ == "__main__":
    main()
