"""Exit codes of repeated 2-rank DeepSpeed launches: a finished run must never report failure.

    python -m bench.launcher_exits [--runs 20] [--ranks 2] [--model PATH] [--out bench/results/launcher_exits.json]

Each run is ``deepspeed --num_gpus 2 --module training.trainer`` with ``config/cpu_config.json`` (ZeRO-3 on CPU
ranks), a tiny Pythia-shaped model (built once, offline, unless ``--model`` names one), the project's sample data,
3 steps with an evaluation at step 2. Printed per run: the launcher's exit code, each rank's, the seconds, and
whether a finished model was saved. Python's faulthandler is on, so a rank that aborts leaves its stacks in the log.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, RESULTS_DIR, result_header, write_json
from bench.synthetic import build_tiny_sample_model
from training.driver.launch import free_port
from training.rank.saving import is_finished_output

RANK_EXIT = re.compile(r"Process (\d+) exits (?:successfully|with return code = (-?\d+))")


SAMPLE_DATA = PROJECT_ROOT / "data" / "dolly_sample.jsonl"


def launch_once(model: Path, output_dir: Path, ranks: int, log_path: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--module",
        "training.trainer",
        "--input-model",
        str(model),
        "--training-dataset",
        str(SAMPLE_DATA),
        "--local-output-dir",
        str(output_dir),
        "--deepspeed",
        str(PROJECT_ROOT / "config" / "cpu_config.json"),
        "--per-device-train-batch-size",
        "4",
        "--per-device-eval-batch-size",
        "4",
        "--test-size",
        "8",
        "--max-steps",
        "3",
        "--eval-steps",
        "2",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONFAULTHANDLER": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    text = log_path.read_text(errors="replace")
    return {
        "exit_code": returncode,
        "rank_exit_codes": [int(code or 0) for _, code in RANK_EXIT.findall(text)],
        "seconds": round(time.perf_counter() - started, 1),
        "finished_model": is_finished_output(output_dir),
        "aborted": "terminate called" in text or "Fatal Python error" in text,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: build the tiny one)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "launcher_exits.json")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy each run's log into this folder")
    args = parser.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        model = args.model or build_tiny_sample_model(scratch_dir / "tiny-model", SAMPLE_DATA)
        logs = args.keep_logs or scratch_dir
        logs.mkdir(parents=True, exist_ok=True)
        for number in range(1, args.runs + 1):
            run = launch_once(model, scratch_dir / f"out-{number}", args.ranks, logs / f"run-{number}.log")
            runs.append(run)
            print(
                f"run {number:2d}: exit {run['exit_code']}, ranks {run['rank_exit_codes']}, {run['seconds']} s, "
                f"finished model: {run['finished_model']}",
                flush=True,
            )
    zero = sum(1 for run in runs if run["exit_code"] == 0 and run["finished_model"])
    result = {
        **result_header("bench.launcher_exits", argv),
        "ranks": args.ranks,
        "runs": runs,
        "zero_exits_with_model": zero,
        "total": len(runs),
    }
    print(f"{zero} of {len(runs)} launches exited 0 with a finished model")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
