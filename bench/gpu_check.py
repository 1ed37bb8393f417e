"""A GPU check that fits a short slot on a bare GPU machine: one bundle, one run, results written part by part.

    python -m bench.gpu_check pack [--python-version 3.12]   # here: one bundle of what the GPU machine lacks
    python -m bench.gpu_check run --out-dir "$OUT"            # there: install it, then check, within 7 minutes
    python -m bench.gpu_check run --dry-run --out-dir DIR     # anywhere: every step on CPU, tiny shapes

The lent machine has torch, accelerate, peft, pyarrow, pandas, numpy, tokenizers and safetensors, but no
transformers, DeepSpeed, datasets or trl, and no package registry. ``pack`` downloads what it lacks for the machine's
Python and writes it as one ``.gpu_wheels/bundle.tar.xz`` of at most 64 MiB (refusing a larger one), the most one
command may carry.

``run`` installs the bundle and runs four parts, each written to ``--out-dir`` as soon as it is done (``PART.json``,
and ``gpu_check.json`` with every part so far), so a run cut short still returns what it finished. A part that would
not fit in what is left of ``--budget`` (7 minutes from the start) is skipped, and says so:

a. ``exactness``: one packed row through the chosen kernel, the per-record loop and each record alone through the
   model's own SDPA, in bf16: outputs and gradients, relative error ``|a - b| / |b|`` of each pair, for GPT-NeoX and a
   grouped-query (Llama) shape;
b. ``trainer_run``: the trainer CLI under ``deepspeed --num_gpus 1`` with ``config/a100_config.json``, bf16, packed,
   a Pythia-410m shape (random weights), 10 steps, saved, then answered through the pipeline; it counts host waits;
c. ``speed``: ``bench.throughput`` at the Pythia-1.4b shape in bf16 on the same records and global batch for ours,
   Dolly's recipe and TRL's padding-free SFT: useful tokens per second, MFU against the bf16 matrix rate measured in
   this run, peak memory, and the ten costliest kernels of ours from ``torch.profiler``;
d. ``host_waits``: the times the host waited for the device in each optimizer step of (b), and where.

``--dry-run`` runs the same parts on CPU in fp32 with tiny shapes and the reference varlen kernel in the CUDA kernel's
place (no host waits to count there): what the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, RESULTS_DIR, result_header, write_json

logger = logging.getLogger(__name__)

WHEELS_DIR = PROJECT_ROOT / ".gpu_wheels"
BUNDLE_NAME = "bundle.tar.xz"
BUNDLE_LIMIT = 64 * 2**20  # what one command may carry, work tree included: checked with the work tree's size
BUDGET_SECONDS = 7 * 60
# What the GPU check imports beyond the machine's own packages (MLflow, TensorBoard, matplotlib and bitsandbytes are
# not needed: the check turns them off, or they are imported only when used).
GPU_REQUIREMENTS = (
    "transformers>=5.24,<6",
    "deepspeed>=0.19.8,<0.20",
    "datasets>=5.2,<6",
    "click>=8.1,<9",
    "tqdm>=4.66",
    "trl>=1.16,<2",
    "psutil>=7,<8",
)
# Already on the GPU machine (device/KINDS.md), with what they bring: never shipped.
PRESENT_ON_THE_MACHINE = tuple(
    [
        "torch",
        "accelerate",
        "peft",
        "pyarrow",
        "pandas",
        "numpy",
        "tokenizers",
        "safetensors",
        "nvidia-",
        "cuda-",
        "triton",
        "sympy",
        "networkx",
        "jinja2",
        "markupsafe",
        "mpmath",
        "setuptools",
        "typing-extensions",
        "typing_extensions",
        "pip",
        "python-dateutil",
        "pytz",
        "tzdata",
        "six",
        "pyyaml",
        "packaging",
        "filelock",
        "click",
        "tqdm",
        "psutil",
        "requests",
        "urllib3",
        "idna",
        "certifi",
        "charset-normalizer",
        "charset_normalizer",
        "regex",
        "xxhash",
        "aiohttp",
        "aiosignal",
        "frozenlist",
        "multidict",
        "yarl",
        "propcache",
        "aiohappyeyeballs",
        "attrs",
        "httpx",
        "httpcore",
        "h11",
        "anyio",
        "hf-xet",
        "hf_xet",
        "msgpack",
        "ninja",
        "py-cpuinfo",
        "py_cpuinfo",
        "einops",
        "rich",
        "pygments",
        "markdown-it-py",
        "markdown_it_py",
        "mdurl",
        "typer",
        "shellingham",
        "sentencepiece",
    ]
)


def pack(python_version: str, out: Path = WHEELS_DIR) -> list[Path]:
    """Download the GPU check's wheels for ``python_version`` (Linux x86-64) and repack them in parts."""
    download = out / "download"
    download.mkdir(parents=True, exist_ok=True)
    platforms = [
        arg
        for tag in ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64")
        for arg in ("--platform", tag)
    ]
    # DeepSpeed is published as a source archive: build its (pure Python) wheel here, without its ops.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(download), GPU_REQUIREMENTS[1]],
        check=True,
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *platforms,
            "--find-links",  # the DeepSpeed wheel built above: pip takes it instead of looking for a binary one
            str(download),
            "-d",
            str(download),
            *GPU_REQUIREMENTS,
        ],
        check=True,
    )
    wheels = sorted(path for path in download.glob("*.whl") if not on_the_machine(path.name))
    return [bundle(wheels, out)]


def on_the_machine(wheel_name: str) -> bool:
    """Whether the GPU machine already has this wheel's distribution (by its exact name: httpx is there, httpx2 is
    not; the CUDA libraries by their prefixes)."""
    distribution = wheel_name.split("-", 1)[0].lower().replace("_", "-")
    present = {name.replace("_", "-") for name in PRESENT_ON_THE_MACHINE}
    return distribution in present or distribution.startswith(("nvidia-", "cuda-"))


def bundle(wheels: list[Path], out: Path, limit: int = BUNDLE_LIMIT) -> Path:
    """The wheels as one xz archive of at most ``limit`` bytes (refused, naming the largest wheels, when larger)."""
    archive = out / BUNDLE_NAME
    with tarfile.open(archive, "w:xz") as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=wheel.name)
    size = archive.stat().st_size
    if size > limit:
        largest = ", ".join(
            f"{w.name} ({w.stat().st_size / 2**20:.1f} MiB)"
            for w in sorted(wheels, key=lambda w: -w.stat().st_size)[:3]
        )
        archive.unlink()
        raise SystemExit(
            f"the bundle would be {size / 2**20:.1f} MiB, over {limit / 2**20:.0f} MiB; largest: {largest}"
        )
    logger.info("%s: %d wheels, %.1f MiB", archive, len(wheels), size / 2**20)
    return archive


def install(archive: Path) -> None:
    """Unpack the carried bundle and install its wheels, offline."""
    if not archive.is_file():
        raise SystemExit(f"no bundle at {archive}: carry the one `python -m bench.gpu_check pack` wrote")
    unpacked = archive.parent / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    found = sorted(unpacked.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, found)], check=True)


def synthetic_model(shape: str, folder: Path) -> Path:
    """A random-weight Pythia shape with a BPE tokenizer trained on the project's records (no hub, no embedded
    package on a bare machine)."""
    from bench.synthetic import build_pythia_model, record_texts

    return build_pythia_model(folder, record_texts(sample_data()), shape=shape, vocab_size=8192)


def sample_data() -> Path:
    from bench.common import default_dataset

    return Path(default_dataset())


# ---- a: exactness ----


def relative_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def exactness(*, dry_run: bool) -> dict[str, Any]:
    """A packed row through the chosen kernel, the per-record loop, and each record alone (the model's own SDPA):
    outputs and gradients, relative error of each pair, for GPT-NeoX and a grouped-query Llama shape."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from training.rank.packed_attention import TORCH_VARLEN, KernelChoice, choose_kernel_for
    from training.rank.packing import DataCollatorForPackedCompletionOnlyLM

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if dry_run else {}
    size = size or dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4)
    heads = 4 if dry_run else 16
    shapes = {
        "gpt_neox": lambda: GPTNeoXForCausalLM(
            GPTNeoXConfig(vocab_size=4096, num_attention_heads=heads, max_position_embeddings=2048, **size)
        ),
        "llama_gqa": lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=4096,
                num_attention_heads=heads,
                num_key_value_heads=heads // 4,
                max_position_embeddings=2048,
                **size,
            )
        ),
    }
    lengths = [37, 412, 96, 250, 18, 140, 77] if not dry_run else [9, 31, 14, 5]
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 4096, (n,), generator=generator).tolist()} for n in lengths]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    batch = DataCollatorForPackedCompletionOnlyLM(tokenizer=None, response_logits_only=False)(rows)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
    probe = torch.randn(1, sum(lengths), 4096, generator=generator).to(device, dtype)
    results: dict[str, Any] = {"dtype": str(dtype), "record_lengths": lengths}
    for family, build in shapes.items():
        torch.manual_seed(0)
        model = build().to(device, dtype)
        model.config.use_cache = False
        if dry_run:
            from bench.varlen_reference import reference_varlen_attn

            chosen, kernel = (
                KernelChoice(TORCH_VARLEN, "dry run: the reference kernel in varlen_attn's place"),
                reference_varlen_attn,
            )
        else:
            chosen, kernel = choose_kernel_for(model, device, "bf16"), None

        results[family] = compare_paths(model, inputs, rows, probe, chosen, kernel)
        del model
    return results


def compare_paths(model, inputs, rows, probe, chosen, kernel) -> dict[str, Any]:
    """Outputs and gradients of one packed row through ``chosen`` (``kernel`` in its place, if given), through the
    per-record loop, and of each record alone through the model's own SDPA; relative error of each pair."""
    import torch

    from training.rank.packed_attention import PER_RECORD_SDPA, KernelChoice, register_packed_attention

    device = probe.device

    def outputs_and_grads(forward: Callable[[], Any]) -> tuple[Any, Any]:
        model.zero_grad()
        logits = forward()
        (logits.float() * probe.float()).sum().backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        return logits.detach(), grads

    def packed() -> Any:
        return model(**inputs).logits

    def alone() -> Any:
        return torch.cat([model(input_ids=torch.tensor([r["input_ids"]], device=device)).logits for r in rows], dim=1)

    measured = {}
    if chosen.replaces_attention:
        model.set_attn_implementation(register_packed_attention(chosen, kernel))
        measured["kernel"] = outputs_and_grads(packed)
    model.set_attn_implementation(register_packed_attention(KernelChoice(PER_RECORD_SDPA, "reference")))
    measured["per_record"] = outputs_and_grads(packed)
    model.set_attn_implementation("sdpa")
    measured["unpacked_sdpa"] = outputs_and_grads(alone)
    pairs = [("kernel", "per_record"), ("kernel", "unpacked_sdpa"), ("per_record", "unpacked_sdpa")]
    return {
        "kernel": chosen.describe(),
        **{
            f"{a}_vs_{b}": {
                "output": relative_error(measured[a][0], measured[b][0]),
                "gradient": relative_error(measured[a][1], measured[b][1]),
            }
            for a, b in pairs
            if a in measured
        },
    }


# ---- b and d: the real path, and its host waits ----


def trainer_run(model_dir: Path, out: Path, *, dry_run: bool, timeout: float) -> dict[str, Any]:
    """Ten optimizer steps of the trainer CLI under ``deepspeed --num_gpus 1`` (ZeRO-3; bf16 and the A100 config on
    the GPU), counting host waits, then a greedy answer from the saved model through the instruction pipeline."""
    config = PROJECT_ROOT / "config" / ("cpu_config.json" if dry_run else "a100_config.json")
    steps = 2 if dry_run else 10
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--module",
        "training.trainer",
        "--input-model",
        str(model_dir),
        "--training-dataset",
        str(sample_data()),
        "--local-output-dir",
        str(out),
        "--deepspeed",
        str(config),
        "--max-steps",
        str(steps),
        "--per-device-train-batch-size",
        "4" if dry_run else "6",
        "--test-size",
        "4",
        "--eval-steps",
        str(steps),
        "--save-steps",
        str(steps),
        "--logging-steps",
        "1",
        "--eval-answers",
        "2",
        "--eval-answer-tokens",
        "8",
        "--packing",
        "--count-host-waits",
        "--no-mlflow",
        "--no-tensorboard",
        *(["--bf16", "false"] if dry_run else ["--bf16", "true"]),
    ]
    started = time.perf_counter()
    completed = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        timeout=timeout,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the trainer run failed:\n{completed.stderr[-4000:]}")
    log = completed.stdout + completed.stderr
    from training.generate import generate_response, load_model_tokenizer_for_generate

    model, tokenizer = load_model_tokenizer_for_generate(str(out))
    if not dry_run:
        model = model.cuda()
    answer = generate_response("Name a primary colour.", model=model, tokenizer=tokenizer, max_new_tokens=8)
    record = json.loads((out / "run_config.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").exists() else {}
    return {
        "exit_code": completed.returncode,
        "seconds": time.perf_counter() - started,
        "steps": steps,
        "precision": record["resolved"]["precision"],
        "world_size": record["resolved"]["world_size"],
        "zero_stage": record["resolved"]["deepspeed_config"]["zero_optimization"]["stage"],
        "attention": record["resolved"].get("attention"),
        "packing_self_check": next(
            (line.split("] ", 1)[-1] for line in log.splitlines() if "self-check" in line), None
        ),
        "losses": [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry],
        "answer": answer,
        "host_waits": json.loads((out / "host_waits.json").read_text()),
    }


# ---- c: speed ----


def matrix_rate(*, dry_run: bool) -> float:
    """FLOP/s of a square matrix product in the training precision, measured here (bf16 on the GPU)."""
    import torch

    n, repeats = (256, 5) if dry_run else (8192, 10)
    device, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if not dry_run:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if not dry_run:
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def costliest_kernels(model_dir: str, *, dry_run: bool, steps: int = 3, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` kernels (CPU ops in the dry run) of ours by device time over ``steps`` packed forward and backward
    passes, from ``torch.profiler``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.common import split_records, tokenize_records
    from training.rank.modeling import get_model_tokenizer
    from training.rank.packing import packing_collator

    dtype = torch.float32 if dry_run else torch.bfloat16
    model, tokenizer = get_model_tokenizer(model_dir, dtype=dtype)
    device = "cpu" if dry_run else "cuda"
    model.to(device).train()
    collator = packing_collator(model, tokenizer, device=device, precision="fp32" if dry_run else "bf16")
    records, _ = split_records(str(sample_data()), 0, 6 * (steps + 1), 0)
    tokenized = tokenize_records(records, tokenizer, 1024)
    batches = [collator(tokenized[i * 6 : (i + 1) * 6]) for i in range(steps + 1)]

    def step(batch) -> None:
        batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up, outside the profile
    activities = [ProfilerActivity.CPU] + ([] if dry_run else [ProfilerActivity.CUDA])
    with profile(activities=activities) as profiler:
        for batch in batches[1:]:
            step(batch)
        if not dry_run:
            torch.cuda.synchronize()
    key = "self_cpu_time_total" if dry_run else "self_device_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: -getattr(e, key))[:top]
    total = sum(getattr(e, key) for e in profiler.key_averages())
    return [
        {"name": e.key, "calls": e.count, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total} for e in events
    ]


def speed(model: str, records: int, *, dry_run: bool) -> dict[str, Any]:
    from bench import throughput as bench_throughput

    args = ["--model", model, "--train-records", str(records), "--eval-records", "8", "--arms", "original,trl,ours"]
    args += ["--out", str(Path(tempfile.mkdtemp()) / "throughput.json")]
    result = bench_throughput.main(args + ([] if dry_run else ["--bf16"]))
    rate = matrix_rate(dry_run=dry_run)
    arms = {
        arm: {
            "useful_tokens_per_second": r["useful_tokens_per_second"],
            "mfu_vs_measured_matrix_rate": r["flops_per_token"] * r["useful_tokens_per_second"] / rate,
            "peak_memory_bytes": r["peak_memory_bytes"],
            "padding_fraction": r["padding_fraction"],
            "eval_loss": r["eval_loss"],
            **({"attention": r["attention"]} if "attention" in r else {}),
        }
        for arm, r in result["arms"].items()
    }
    ours = arms.get("ours", {}).get("useful_tokens_per_second")
    return {
        "model": model,
        "train_records": records,
        "batch_size": result["batch_size"],
        "matrix_rate_flops": rate,
        "arms": arms,
        **{
            f"ours_vs_{base}": ours / arms[base]["useful_tokens_per_second"]
            for base in ("original", "trl")
            if ours and base in arms
        },
        "ours_costliest_kernels": costliest_kernels(bench_throughput.resolve_model(model), dry_run=dry_run),
    }


# ---- the run ----


class PartWriter:
    """Writes each part as soon as it is done (``PART.json``, and ``gpu_check.json`` with every part so far)."""

    def __init__(self, out_dir: Path, header: dict[str, Any], budget: float, started: float):
        self.out_dir = out_dir
        self.payload = header
        self.budget = budget
        self.started = started
        out_dir.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def run(self, name: str, needs_seconds: float, work: Callable[[float], dict[str, Any]]) -> None:
        """Run ``work(seconds left)`` unless fewer than ``needs_seconds`` are left; record its result or error."""
        part_started = time.monotonic()
        if self.left() < needs_seconds:
            result: dict[str, Any] = {
                "skipped": f"{self.left():.0f} s left of the budget, the part needs ~{needs_seconds:.0f} s"
            }
        else:
            try:
                result = work(self.left())
            except Exception as err:  # record it and go on: the other parts still report
                logger.exception("GPU check part %s failed", name)
                result = {"error": f"{type(err).__name__}: {str(err)[-2000:]}"}
        result["part_seconds"] = time.monotonic() - part_started
        self.payload[name] = result
        self.payload["seconds"] = time.monotonic() - self.started
        write_json(self.out_dir / f"{name}.json", result)
        write_json(self.out_dir / "gpu_check.json", self.payload)
        logger.info("GPU check: %s done (%.0f s left)", name, self.left())


def run(options: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    import torch

    if not options.dry_run:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run to check everything else")
        install(options.bundle)
    header = {
        **result_header("bench.gpu_check", options.argv),
        "dry_run": options.dry_run,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "budget_seconds": options.budget,
    }
    parts = PartWriter(options.out_dir, header, options.budget, started)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        parts.run("exactness", 20, lambda left: exactness(dry_run=options.dry_run))
        shape = "tiny" if options.dry_run else "410m"

        def real_path(left: float) -> dict[str, Any]:
            model_dir = synthetic_model(shape, scratch / f"pythia-{shape}")
            return trainer_run(model_dir, scratch / "out", dry_run=options.dry_run, timeout=max(left - 10, 30))

        parts.run("trainer_run", 60, real_path)
        waits = parts.payload["trainer_run"].get("host_waits", {"skipped": "the trainer run did not finish"})
        parts.run("host_waits", 0, lambda left: dict(waits))
        # On the GPU the Pythia-1.4B shape bench.throughput builds; in the dry run, a tiny one.
        model = str(synthetic_model("tiny", scratch / "pythia-speed")) if options.dry_run else "pythia-1.4b"
        parts.run("speed", 150, lambda left: speed(model, 12 if options.dry_run else 96, dry_run=options.dry_run))
    print(json.dumps(parts.payload, indent=2))
    return parts.payload


def main(argv: list[str] | None = None) -> dict[str, Any] | list[Path]:
    from training.logs import configure_logging

    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="download what the GPU machine lacks, as one bundle")
    packing.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    packing.add_argument("--out", type=Path, default=WHEELS_DIR)
    running = commands.add_parser("run", help="install the carried bundle and run the check")
    running.add_argument("--dry-run", action="store_true", help="on CPU: every part, tiny shapes, fp32")
    running.add_argument("--bundle", type=Path, default=WHEELS_DIR / BUNDLE_NAME)
    running.add_argument(
        "--out-dir", type=Path, default=Path(os.environ.get("OUT", RESULTS_DIR / "gpu_check")), help="where parts go"
    )
    running.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for the whole run")
    options = parser.parse_args(argv)
    options.argv = argv if argv is not None else sys.argv[1:]
    if options.command == "pack":
        return pack(options.python_version, options.out)
    return run(options)


if __name__ == "__main__":
    main()
