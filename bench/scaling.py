"""How cost grows: our trainer's useful tokens per second and peak memory as the data and the max length grow.

    python -m bench.scaling [--model embedded] [--records 120,480,1144] [--max-lengths 512,1024,2048]

Two sweeps over the real dolly sample, sharing one point:

- records: the first N records of a seeded shuffle (the same order for every N), at ``--length-for-records``;
- max length: ``--records-for-lengths`` records at each max length (records longer than it are dropped, as the
  trainer drops them).

Every point is our arm of bench/throughput.py (padding-free packing, ``--batch-size`` records per optimizer step,
one epoch, no held-out evaluation) in a process of its own, so its peak memory is its own. Peak memory is the
process's maximum resident set on CPU and torch's peak allocation on a GPU; ``largest_batch_positions`` is the most
token positions one step handed the model, which is what activation memory follows. Results go to
bench/results/scaling.json and a plot next to it
(``--replot`` redraws the plot from that file).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    default_dataset,
    pyplot,
    result_header,
    run_in_own_process,
    save_figure,
    write_json,
)
from bench.throughput import resolve_model
from training.logs import configure_logging

logger = logging.getLogger(__name__)


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def sweep_points(options: argparse.Namespace) -> list[tuple[int, int]]:
    """(records, max length) for both sweeps, the shared point once, in the order they run."""
    points = [(records, options.length_for_records) for records in options.records]
    points += [(options.records_for_lengths, length) for length in options.max_lengths]
    return list(dict.fromkeys(points))


def measure_point(records: int, max_length: int, options: argparse.Namespace) -> dict[str, Any]:
    """One epoch of our arm on ``records`` records at ``max_length``, in its own process."""
    args = [
        "--model",
        options.model,
        "--training-dataset",
        options.training_dataset,
        "--train-records",
        str(records),
        "--eval-records",
        "0",
        "--max-length",
        str(max_length),
        "--batch-size",
        str(options.batch_size),
        "--lr",
        str(options.lr),
        "--seed",
        str(options.seed),
        "--run-arm",
        "ours",
    ]
    if options.bf16:
        args.append("--bf16")
    arm = run_in_own_process("bench.throughput", args)
    keys = (
        "train_records",
        "record_tokens",
        "useful_tokens",
        "optimizer_steps",
        "seconds",
        "useful_tokens_per_second",
        "peak_memory_bytes",
        "peak_memory_kind",
        "largest_batch_positions",
    )
    return {"records": records, "max_length": max_length, **{key: arm[key] for key in keys}}


def draw_chart(payload: dict[str, Any], path: Path) -> None:
    """Throughput against records, peak memory against max length, and peak memory against the largest step."""
    fig, (speed, memory, by_step) = pyplot().subplots(1, 3, figsize=(12, 3.8))
    gib = 2**30
    records = payload["records_sweep"]
    speed.plot(
        [p["records"] for p in records], [p["useful_tokens_per_second"] for p in records], marker="o", color="#dd8452"
    )
    speed.set(
        xlabel=f"records (max length {payload['length_for_records']})",
        ylabel="useful tokens / second",
        xticks=[p["records"] for p in records],
    )
    lengths = payload["length_sweep"]
    memory.plot(
        [p["max_length"] for p in lengths], [p["peak_memory_bytes"] / gib for p in lengths], marker="o", color="#4c72b0"
    )
    memory.set(
        xlabel=f"max length ({payload['records_for_lengths']} records)",
        ylabel="peak memory (GiB)",
        xticks=[p["max_length"] for p in lengths],
    )
    points = {(p["records"], p["max_length"]): p for p in records + lengths}
    for (n, length), p in points.items():
        by_step.scatter(p["largest_batch_positions"], p["peak_memory_bytes"] / gib, color="#55a868")
        by_step.annotate(
            f"{n} rec, {length}",
            (p["largest_batch_positions"], p["peak_memory_bytes"] / gib),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    by_step.set(xlabel="largest step (token positions), every point", ylabel="peak memory (GiB)")
    for axis in (speed, memory, by_step):
        axis.set_ylim(bottom=0)
    save_figure(fig, path, f"{payload['model']}, {payload['machine']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--training-dataset", default=default_dataset())
    parser.add_argument("--records", type=int_list, default=[120, 480, 1144])
    parser.add_argument("--length-for-records", type=int, default=1024)
    parser.add_argument("--max-lengths", type=int_list, default=[512, 1024, 2048])
    parser.add_argument("--records-for-lengths", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true", help="bf16 on a GPU (ignored on CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scaling.json")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the result file --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    options = parse_args(argv)
    if options.replot:
        payload = json.loads(options.out.read_text())
        draw_chart(payload, options.out.with_suffix(".png"))
        return payload
    resolve_model(options.model)  # build or convert once, before the points start
    measured = {}
    for records, max_length in sweep_points(options):
        logger.info("%d records at max length %d", records, max_length)
        measured[records, max_length] = measure_point(records, max_length, options)
    payload: dict[str, Any] = {
        **result_header("bench.scaling", argv),
        "model": options.model,
        "training_dataset": Path(options.training_dataset).name,
        "batch_size": options.batch_size,
        "length_for_records": options.length_for_records,
        "records_for_lengths": options.records_for_lengths,
        "records_sweep": [measured[r, options.length_for_records] for r in options.records],
        "length_sweep": [measured[options.records_for_lengths, n] for n in options.max_lengths],
    }
    speeds = [p["useful_tokens_per_second"] for p in payload["records_sweep"]]
    payload["records_sweep_speed_spread"] = max(speeds) / min(speeds) - 1
    write_json(options.out, payload)
    draw_chart(payload, options.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in payload.items() if not k.endswith("_sweep")}, indent=2))
    return payload


if __name__ == "__main__":
    main()
