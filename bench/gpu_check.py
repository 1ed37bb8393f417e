"""A GPU check that fits a short lease on a bare GPU machine: the real GPU path, and throughput with MFU.

    python -m bench.gpu_check pack [--python-version 3.12]     # here: the wheels the GPU machine lacks
    python -m bench.gpu_check run [--wheels .gpu_wheels]        # there: install them, then check
    python -m bench.gpu_check run --dry-run                     # anywhere: every step but the CUDA ones

The lent machine has torch and accelerate (and their dependencies) but no transformers, DeepSpeed, datasets or peft,
and no package registry; what it needs travels with the work tree, at most 64 MiB per command. ``pack`` downloads
those wheels for the machine's Python, repacks them as ``.gpu_wheels/part-N.tar.xz`` (xz: pyarrow alone is 55 MB as
a wheel, 36 MiB this way), each below the limit. Carry one part per command, each unpacked into ``.gpu_wheels/``
(which stays between commands while the machine is held), then ``run``.

``run`` does, within about 8 minutes on one GPU:

1. a 2-step run of the real trainer CLI under ``deepspeed --num_gpus 1``, ZeRO-3, bf16, on a random Pythia-410m
   shape (packed rows: per-record attention bounds, FlashAttention where it can be imported), then a greedy answer
   from the saved model through ``pipeline(..., trust_remote_code=True)``: NCCL, bf16, saving, the pipeline;
2. ``bench.throughput --model pythia-1.4b --bf16`` with all its arms, each arm's MFU against the GPU's dense bf16
   peak, the GPU's name in the result file.

Results go to ``bench/results/gpu_check.json``. ``--dry-run`` runs the same steps on CPU with the tiny shape, in
fp32, on a few records, with the wheels already installed: what the test suite runs.
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
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, RESULTS_DIR, result_header, write_json

logger = logging.getLogger(__name__)

WHEELS_DIR = PROJECT_ROOT / ".gpu_wheels"
PART_LIMIT = 60 * 2**20  # below the 64 MiB a command may carry, with room for the work tree itself
# What the GPU check imports beyond the machine's torch and accelerate (MLflow, TensorBoard, matplotlib, peft and
# bitsandbytes are not needed: the check turns them off, or they are imported only when used).
GPU_REQUIREMENTS = (
    "transformers>=5.24,<6",
    "deepspeed>=0.19.8,<0.20",
    "datasets>=5.2,<6",
    "click>=8.1,<9",
    "tqdm>=4.66",
    "trl>=1.16,<2",
    "psutil>=7,<8",
)
PRESENT_ON_THE_MACHINE = (
    "torch",
    "accelerate",
    "numpy",
    "nvidia-",
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
            "-d",
            str(download),
            *GPU_REQUIREMENTS,
        ],
        check=True,
    )
    wheels = sorted(
        path
        for path in download.glob("*.whl")
        if not path.name.lower().replace("_", "-").startswith(PRESENT_ON_THE_MACHINE)
    )
    return repack(wheels, out)


def repack(wheels: list[Path], out: Path, limit: int = PART_LIMIT) -> list[Path]:
    """The wheels as xz archives of at most ``limit`` bytes each (largest first, each into the first part with room)."""
    parts: list[list[Path]] = []
    sizes: list[int] = []
    for wheel in sorted(wheels, key=lambda path: -path.stat().st_size):
        estimate = wheel.stat().st_size  # xz never grows a wheel: its zipped size bounds its share of a part
        fitting = next((i for i, size in enumerate(sizes) if size + estimate <= limit), None)
        if fitting is None:
            parts.append([])
            sizes.append(0)
            fitting = len(parts) - 1
        parts[fitting].append(wheel)
        sizes[fitting] += estimate
    written = []
    for number, members in enumerate(parts, start=1):
        archive = out / f"part-{number}.tar.xz"
        with tarfile.open(archive, "w:xz") as tar:
            for wheel in members:
                tar.add(wheel, arcname=wheel.name)
        written.append(archive)
        logger.info("%s: %d wheels, %.1f MiB", archive.name, len(members), archive.stat().st_size / 2**20)
    return written


def install(wheels: Path) -> None:
    """Unpack the carried parts and install their wheels, offline."""
    for archive in sorted(wheels.glob("part-*.tar.xz")):
        with tarfile.open(archive) as tar:
            tar.extractall(wheels / "unpacked", filter="data")
    found = sorted((wheels / "unpacked").glob("*.whl"))
    if not found:
        raise SystemExit(f"no wheels in {wheels}: carry the parts that `python -m bench.gpu_check pack` wrote")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, found)], check=True)


def synthetic_model(shape: str, folder: Path) -> Path:
    """A random-weight Pythia shape with a BPE tokenizer trained on the project's records (no hub, no embedded
    package on a bare machine)."""
    from bench.synthetic import build_pythia_model, record_texts

    return build_pythia_model(folder, record_texts(sample_data()), shape=shape, vocab_size=8192)


def sample_data() -> Path:
    from bench.common import default_dataset

    return Path(default_dataset())


def trainer_run(model_dir: Path, out: Path, *, dry_run: bool) -> dict[str, Any]:
    """Two optimizer steps of the trainer CLI under ``deepspeed --num_gpus 1`` (ZeRO-3; bf16 on the GPU), then a
    greedy answer from the saved model through ``pipeline(..., trust_remote_code=True)``."""
    config = PROJECT_ROOT / "config" / ("cpu_config.json" if dry_run else "a100_config.json")
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
        "2",
        "--per-device-train-batch-size",
        "4",
        "--test-size",
        "4",
        "--eval-steps",
        "2",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--eval-answers",
        "2",
        "--eval-answer-tokens",
        "8",
        "--no-mlflow",
        "--no-tensorboard",
        *(["--bf16", "false"] if dry_run else ["--bf16", "true"]),
    ]
    started = time.perf_counter()
    completed = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the trainer run failed:\n{completed.stderr[-4000:]}")
    log = completed.stdout + completed.stderr
    from transformers import pipeline

    generate = pipeline(model=str(out), trust_remote_code=True, device_map="auto")
    answer = generate("Name a primary colour.", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    record = json.loads((out / "run_config.json").read_text())
    return {
        "seconds": time.perf_counter() - started,
        "precision": record["resolved"]["precision"],
        "world_size": record["resolved"]["world_size"],
        "zero_stage": record["resolved"]["deepspeed_config"]["zero_optimization"]["stage"],
        "attention": "flash_attention_2" if "flash_attention_2" in log else "per-record SDPA",
        "packing_self_check": next(
            (line.split("] ", 1)[-1] for line in log.splitlines() if "self-check" in line), None
        ),
        "answer": answer,
        "pipeline": type(generate).__name__,
    }


def throughput(model: str, records: int, *, dry_run: bool) -> dict[str, Any]:
    from bench import throughput as bench_throughput

    args = [
        "--model",
        model,
        "--train-records",
        str(records),
        "--eval-records",
        "8",
        "--out",
        str(Path(tempfile.mkdtemp()) / "throughput.json"),
    ]
    return bench_throughput.main(args + ([] if dry_run else ["--bf16"]))


def run(options: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not options.dry_run:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run to check everything else")
        install(options.wheels)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        shape = "tiny" if options.dry_run else "410m"
        model_dir = synthetic_model(shape, scratch / f"pythia-{shape}")
        trainer = trainer_run(model_dir, scratch / "out", dry_run=options.dry_run)
        # On the GPU, the Pythia-1.4B shape bench.throughput builds; in the dry run, the tiny one above.
        speed = throughput(
            str(model_dir) if options.dry_run else "pythia-1.4b",
            12 if options.dry_run else 120,
            dry_run=options.dry_run,
        )
    payload = {
        **result_header("bench.gpu_check", options.argv),
        "dry_run": options.dry_run,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "trainer_run": trainer,
        "throughput": {
            arm: {key: result.get(key) for key in ("useful_tokens_per_second", "mfu", "peak_memory_bytes")}
            for arm, result in speed["arms"].items()
        },
        "seconds": time.perf_counter() - started,
    }
    write_json(options.out, payload)
    print(json.dumps(payload, indent=2))
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any] | list[Path]:
    from training.logs import configure_logging

    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="download and repack the wheels the GPU machine lacks")
    packing.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    packing.add_argument("--out", type=Path, default=WHEELS_DIR)
    running = commands.add_parser("run", help="install the carried wheels and run the check")
    running.add_argument("--dry-run", action="store_true", help="on CPU: every step but the CUDA ones")
    running.add_argument("--wheels", type=Path, default=WHEELS_DIR)
    running.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_check.json")
    options = parser.parse_args(argv)
    options.argv = argv if argv is not None else sys.argv[1:]
    if options.command == "pack":
        return pack(options.python_version, options.out)
    return run(options)


if __name__ == "__main__":
    main()
