"""Shared pieces of the benchmarks: real records, a fixed held-out split, response-only loss, and result files."""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.data import read_records
from training.preprocess import IGNORE_INDEX, preprocess_batch
from training.prompts import format_training_text
from training.rank.collators import DataCollatorForCompletionOnlyLM

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DOLLY = PROJECT_ROOT.parent / "shared" / "data" / "dolly-15k-sample.jsonl"
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"


def default_dataset() -> str:
    """Real dolly records when present (../shared/data), else the project's own sample."""
    return str(SHARED_DOLLY if SHARED_DOLLY.exists() else PROJECT_ROOT / "data" / "dolly_sample.jsonl")


def split_records(path: str, eval_records: int, train_records: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """A fixed, seeded held-out set and up to ``train_records`` training records from the rest."""
    records = read_records(path)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if eval_records >= len(records):
        raise ValueError(f"{path} has {len(records)} records; cannot hold out {eval_records}")
    held_out = [records[i] for i in order[:eval_records]]
    train = [records[i] for i in order[eval_records:]]
    return (train[:train_records] if train_records else train), held_out


def tokenize_records(records: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
    """Records tokenized with labels (prompt masked), keeping category; longer than ``max_length`` dropped."""
    if not records:
        return []
    batch = {key: [r[key] for r in records] for key in ("instruction", "context", "response")}
    batch["text"] = [format_training_text(r["instruction"], r["response"], r["context"]) for r in records]
    features = preprocess_batch(batch, tokenizer, max_length)
    tokenized = [
        {"input_ids": ids, "labels": labels, "category": record.get("category") or "unknown"}
        for ids, labels, record in zip(features["input_ids"], features["labels"], records)
    ]
    return [r for r in tokenized if len(r["input_ids"]) <= max_length]


def as_dataset(tokenized: list[dict]) -> Dataset:
    return Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized])


@torch.no_grad()
def response_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokenized: list[dict], batch_size: int = 8
) -> dict[str, Any]:
    """Mean loss per response token on ``tokenized`` (the training masking), overall and per category."""
    model.eval()
    collate = DataCollatorForCompletionOnlyLM(tokenizer=tokenizer)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for start in range(0, len(tokenized), batch_size):
        chunk = tokenized[start : start + batch_size]
        batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in chunk])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shifted_labels = batch["labels"][:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        for row, record in enumerate(chunk):
            mask = shifted_labels[row] != IGNORE_INDEX
            for key in ("overall", record["category"]):
                sums[key] += token_losses[row][mask].sum().item()
                counts[key] += int(mask.sum().item())
    return {key: {"loss": sums[key] / counts[key], "tokens": counts[key]} for key in sorted(counts)}


def machine() -> str:
    """A one-line description of where a benchmark ran."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} (no GPU)"


def result_header(module: str, argv: list[str] | None, **fields: Any) -> dict[str, Any]:
    """What every result file starts with: the command that made it, the machine it ran on, then ``fields``."""
    args = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--"]
    return {"command": "python -m " + shlex.join([module, *args]), "machine": machine(), **fields}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write a result file atomically (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)


def peak_memory_bytes() -> int:
    """Peak memory of this process: torch's peak allocation on a GPU, else the maximum resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_training(trainer) -> float:
    """Train, and return the seconds it took (peak GPU memory counted from here)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def run_arms(module: str, arms: list[str], argv: list[str] | None) -> tuple[list[str], dict[str, dict]]:
    """Run each arm as ``python -m MODULE ARGV --run-arm ARM`` in its own process (so its peak memory is its own).

    Returns the forwarded arguments and each arm's result.
    """
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--"]
    results: dict[str, dict] = {}
    for arm in arms:
        print(f"== arm {arm}", flush=True)
        results[arm] = run_in_own_process(module, [*forwarded, "--run-arm", arm])
    return forwarded, results


def run_in_own_process(module: str, args: list[str]) -> dict[str, Any]:
    """``python -m MODULE ARGS --arm-result FILE`` in a fresh process; returns the JSON it wrote to FILE."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        subprocess.run([sys.executable, "-m", module, *args, "--arm-result", str(result_file)], check=True)
        return json.loads(result_file.read_text())


def pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
