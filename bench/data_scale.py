"""How the data path scales: dolly-shaped records at 15,000, 150,000 and 1,500,000, prepared for a 2-rank launch.

The records are the shared sample's real dolly records (``../shared/data/dolly-15k-sample.jsonl``, 1,144 records;
the project's own sample where it is absent) repeated until there are enough, every copy's instruction suffixed
with `` (copy N)`` so that no two records are the same. For each size, with an empty prepared-data cache, the bench
launches ``deepspeed --num_gpus 2 --module bench.data_scale_rank`` (the trainer under ZeRO-3 on the CPU
accelerator, the tiny Pythia-shaped model, one optimizer step) and samples every process of the launch from
``/proc`` every 0.2 s. It reports, per size: the seconds from the launch to the first optimizer step; where they
go (reading and checking, tokenizing, the rest of the preparation, the rest of the start); the seconds each rank
spent tokenizing; and the peak memory of each rank, of its tokenizing workers (summed), and of the launcher (the
driver): RSS, and the anonymous memory (``Pss_Anon``: not a file's pages, which a memory-mapped dataset adds to RSS
only; pages a forked worker shares with its rank count half to each, so the sums do not count them twice).

    python -m bench.data_scale                      # 15k, 150k, 1.5M (about 30 minutes on 2 cores)
    python -m bench.data_scale --sizes 15000,150000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import PROJECT_ROOT, RESULTS_DIR, default_dataset, pyplot, result_header, save_figure, write_json
from bench.synthetic import build_tiny_sample_model
from training.data import validated_records
from training.driver.plan import free_port
from training.prepared_data import INFO_NAME

SAMPLE_EVERY_S = 0.2
GOALS = {
    "per_record_cost_spread": 0.25,  # cost per record flat within 25% from the smallest size to the largest
    "rank_memory_growth_bytes": 1.5e9,  # a rank's peak at the largest size at most 1.5 GB above the smallest's
    "largest_ready_seconds": 15 * 60,  # the largest size ready for its first step within 15 minutes
}


def write_records(source: str, count: int, path: Path) -> None:
    """``count`` records: ``source``'s repeated, each copy's instruction suffixed `` (copy N)`` (N from 0)."""
    records = list(validated_records(source))
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            copy, record = divmod(index, len(records))
            record = dict(records[record])
            record["instruction"] = f"{record['instruction']} (copy {copy})"
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def process_memory(pid: int) -> tuple[int, int]:
    """A process's resident memory and its proportional share of anonymous memory (``Pss_Anon``: pages it shares
    copy-on-write with a parent it was forked from count half to each), in bytes, from /proc; zeros once it is
    gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in rollup.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss_Anon"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("Rss", 0), values.get("Pss_Anon", 0)


def rank_of(process: psutil.Process) -> int | None:
    try:
        for part in process.cmdline():
            if part.startswith("--local_rank="):
                return int(part.split("=", 1)[1])
    except psutil.Error:
        pass
    return None


class MemorySampler:
    """Peak memory of each role in a launch: ``rank R``, ``rank R workers`` (its children, summed), ``launcher``."""

    def __init__(self, root: psutil.Process):
        self.root = root
        self.peaks: dict[str, dict[str, int]] = {}

    def _note(self, role: str, rss: int, anon: int) -> None:
        peak = self.peaks.setdefault(role, {"rss": 0, "anon": 0})
        peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        # A rank's tokenizing workers are forked from it, so they carry its command line too: a rank is the
        # outermost process with that command line.
        flagged = {process.pid: rank for process in processes if (rank := rank_of(process)) is not None}
        ranks = {pid: rank for pid, rank in flagged.items() if _parent_pid(pid) not in flagged}
        launcher = [0, 0]
        workers: dict[int, list[int]] = {}
        for process in processes:
            rss, anon = process_memory(process.pid)
            if process.pid in ranks:
                self._note(f"rank {ranks[process.pid]}", rss, anon)
                continue
            parent = next((p.pid for p in _parents(process) if p.pid in ranks), None)
            if parent is None:
                launcher[0] += rss
                launcher[1] += anon
            else:
                totals = workers.setdefault(ranks[parent], [0, 0])
                totals[0] += rss
                totals[1] += anon
        self._note("launcher", *launcher)
        for rank, (rss, anon) in workers.items():
            self._note(f"rank {rank} workers", rss, anon)


def _parent_pid(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _parents(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.parents()
    except psutil.Error:
        return []


def launch(model_dir: Path, data: Path, scratch: Path, ranks: int) -> dict[str, Any]:
    """One launch on ``data`` with an empty cache: its timings and memory peaks."""
    notes = scratch / "notes"
    notes.mkdir()
    cache = scratch / "prepared"
    args = [
        "--input-model", str(model_dir), "--training-dataset", str(data),
        "--local-output-dir", str(scratch / "out"), "--dataset-cache-dir", str(cache),
        "--deepspeed", str(PROJECT_ROOT / "config" / "cpu_config.json"),
        "--per-device-train-batch-size", "4", "--max-steps", "1", "--test-size", "0",
        "--save-steps", "1000", "--eval-answers", "0", "--no-mlflow", "--no-tensorboard",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "--module", "bench.data_scale_rank", *args,
    ]  # fmt: skip
    env = {**_environment(), "DOLLY_BENCH_DIR": str(notes)}
    log = scratch / "launch.log"
    started = time.time()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        sampler = MemorySampler(psutil.Process(process.pid))
        while process.poll() is None:
            sampler.sample()
            time.sleep(SAMPLE_EVERY_S)
    if process.returncode != 0:
        raise RuntimeError(f"the launch failed ({process.returncode}); its log: {log}\n{log.read_text()[-4000:]}")
    first_steps = [json.loads(path.read_text())["first_step_end"] for path in notes.glob("first_step_rank*.json")]
    info = json.loads(next(cache.glob(f"*/{INFO_NAME}")).read_text())
    tokenizing: dict[str, float] = {str(rank): 0.0 for rank in range(ranks)}
    for path in notes.glob("tokenize_*.txt"):
        for line in path.read_text().splitlines():
            rank, _, seconds = line.split()
            tokenizing[rank] = tokenizing.get(rank, 0.0) + float(seconds)
    ready = max(first_steps) - started
    return {
        "seconds_to_first_step": round(ready, 2),
        "preparation": {
            key: info[key] for key in ("seconds", "read_seconds", "tokenize_seconds", "records", "within_max_length")
        },
        "rest_of_start_seconds": round(ready - info["seconds"], 2),
        "tokenizing_seconds_by_rank": {rank: round(seconds, 2) for rank, seconds in sorted(tokenizing.items())},
        "peak_memory_bytes": dict(sorted(sampler.peaks.items())),
    }


def _environment() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def goals(sizes: dict[int, dict[str, Any]], ranks: int) -> dict[str, Any]:
    smallest, largest = min(sizes), max(sizes)
    per_record = {n: sizes[n]["preparation"]["seconds"] / n for n in sizes}
    spread = max(per_record.values()) / min(per_record.values()) - 1
    growth = max(
        sizes[largest]["peak_memory_bytes"][f"rank {r}"]["anon"]
        - sizes[smallest]["peak_memory_bytes"][f"rank {r}"]["anon"]
        for r in range(ranks)
    )
    others_tokenizing = sum(
        seconds for n in sizes for rank, seconds in sizes[n]["tokenizing_seconds_by_rank"].items() if rank != "0"
    )
    return {
        "preparation_seconds_per_record": {str(n): per_record[n] for n in sorted(per_record)},
        "per_record_cost_spread": round(spread, 3),
        "per_record_cost_flat_within_25%": spread <= GOALS["per_record_cost_spread"],
        "rank_anon_memory_growth_bytes": growth,
        "rank_memory_growth_within_1.5GB": growth <= GOALS["rank_memory_growth_bytes"],
        "other_ranks_tokenizing_seconds": others_tokenizing,
        "largest_seconds_to_first_step": sizes[largest]["seconds_to_first_step"],
        "largest_ready_within_15_minutes": sizes[largest]["seconds_to_first_step"] <= GOALS["largest_ready_seconds"],
    }


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    sizes = {int(n): figures for n, figures in results["sizes"].items()}
    counts = sorted(sizes)
    fig, (timing, memory) = plt.subplots(1, 2, figsize=(10, 4))
    timing.plot(counts, [sizes[n]["seconds_to_first_step"] for n in counts], "o-", label="launch to first step")
    timing.plot(counts, [sizes[n]["preparation"]["seconds"] for n in counts], "s--", label="preparing the data")
    timing.plot(counts, [sizes[n]["preparation"]["tokenize_seconds"] for n in counts], "^:", label="of it, tokenizing")
    timing.set(xscale="log", yscale="log", xlabel="records", ylabel="seconds")
    timing.legend(fontsize=8)
    for role in sorted({role for n in counts for role in sizes[n]["peak_memory_bytes"]}):
        memory.plot(
            counts, [sizes[n]["peak_memory_bytes"].get(role, {}).get("anon", 0) / 1e9 for n in counts], "o-", label=role
        )
    memory.set(xscale="log", xlabel="records", ylabel="peak RssAnon (GB)")
    memory.legend(fontsize=8)
    save_figure(fig, path, f"Data preparation for a 2-rank launch ({results['machine']})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="15000,150000,1500000", help="record counts, comma-separated")
    parser.add_argument("--source", default=default_dataset(), help="the records to repeat")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "data_scale.json")
    parser.add_argument("--scratch", type=Path, default=None, help="where the records and caches go (a temp folder)")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    scratch_root = Path(tempfile.mkdtemp(prefix="data-scale-", dir=args.scratch))
    try:
        model_dir = build_tiny_sample_model(scratch_root / "model", PROJECT_ROOT / "data" / "dolly_sample.jsonl")
        figures: dict[int, dict[str, Any]] = {}
        for size in sizes:
            scratch = scratch_root / str(size)
            scratch.mkdir()
            data = scratch / "records.jsonl"
            write_records(args.source, size, data)
            print(f"== {size} records ({data.stat().st_size / 1e6:.0f} MB)", flush=True)
            figures[size] = {"file_bytes": data.stat().st_size, **launch(model_dir, data, scratch, args.ranks)}
            print(json.dumps(figures[size], indent=1), flush=True)
            shutil.rmtree(scratch)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    results = result_header(
        "bench.data_scale",
        argv,
        source=args.source,
        records_made="the source's records repeated; every copy's instruction suffixed ' (copy N)'",
        ranks=args.ranks,
        sizes={str(n): figures[n] for n in sizes},
        goals=goals(figures, args.ranks) if len(sizes) > 1 else {},
    )
    write_json(args.output, results)
    plot(results, args.output.with_suffix(".png"))
    print(json.dumps(results["goals"], indent=1))
    return results


if __name__ == "__main__":
    main()
