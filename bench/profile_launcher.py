"""Where the time goes under the DeepSpeed launcher: both arms of bench/throughput_deepspeed.py, profiled.

    python -m bench.profile_launcher [--model embedded] [--train-records 48] [--profile-steps 3:4]

Each arm (Dolly's padded batches, our packing) runs in its own ``deepspeed --num_gpus 2`` launch of the real
trainer CLI (through bench/profiled_trainer.py), once per variant (default: unbalanced, as shipped):

- unbalanced: ``--no-balance-ranks``, each step's records dealt to the ranks in order, as Dolly's sampler does;
- as shipped: the trainer's defaults (each step's records split so that every rank gets about the same tokens;
  Dolly's activation checkpointing on; DeepSpeed's launcher leaves each CPU rank at torch's default of one intra-op
  thread per core of the machine);
- no checkpointing: ``--no-gradient-checkpointing``;
- cores shared out: ``OMP_NUM_THREADS`` = cores / ranks, as ``torchrun`` and DeepSpeed's ``--bind_cores_to_rank`` set.

``torch.profiler`` covers the same optimizer steps on every rank. Each operator's self CPU time is put in one bucket
(ZeRO-3's gradient reduction, other communication, matrix products, attention, optimizer, other operators); what
the operators do not account for is Python and waiting. Results go to bench/results/profile_launcher.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, default_dataset, result_header, split_records, write_json
from bench.throughput_deepspeed import launch_arm
from bench.throughput_deepspeed import parse_args as throughput_deepspeed_args
from training.logs import configure_logging

logger = logging.getLogger(__name__)

VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "unbalanced": (("--no-balance-ranks",), {}),
    "as shipped": ((), {}),
    "no checkpointing": (("--no-gradient-checkpointing",), {}),
    "cores shared out": ((), {"OMP_NUM_THREADS": "{threads_per_rank}"}),
}
DEFAULT_VARIANTS = ("unbalanced", "as shipped")

# Substrings of operator names, first match wins. ZeRO-3 reduces and partitions each gradient in a hook that runs
# after the gradient is accumulated (``register_post_accumulate_grad_hook``), so the profiler counts that hook, and
# its waits for the reduction, as AccumulateGrad's own time.
BUCKETS = {
    "gradient reduction (ZeRO-3 hooks)": ("accumulategrad",),
    "communication": (
        "all_gather",
        "allgather",
        "reduce_scatter",
        "all_reduce",
        "allreduce",
        "broadcast",
        "c10d::",
        "gloo",
        "barrier",
        "record_param_comms",
        "wait",
    ),
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention", "softmax"),
    "optimizer": ("adam", "_foreach_"),
}


def bucket_of(operator: str) -> str:
    name = operator.lower()
    return next((bucket for bucket, keys in BUCKETS.items() if any(key in name for key in keys)), "other operators")


def summarize(profile: dict[str, Any]) -> dict[str, Any]:
    """Seconds per profiled step in each bucket, and the top operators, for one rank."""
    steps = profile["steps"][1] - profile["steps"][0] + 1
    buckets: dict[str, float] = {}
    for name, op in profile["operators"].items():
        buckets[bucket_of(name)] = buckets.get(bucket_of(name), 0.0) + op["self_cpu_seconds"] / steps
    step_seconds = profile["wall_seconds"] / steps
    buckets["python and waiting"] = max(0.0, step_seconds - sum(buckets.values()))
    top = sorted(profile["operators"].items(), key=lambda item: -item[1]["self_cpu_seconds"])[:12]
    return {
        "step_seconds": step_seconds,
        "intra_op_threads": profile["intra_op_threads"],
        "positions_per_step": profile.get("positions_per_step", []),
        "seconds_per_step": dict(sorted(buckets.items(), key=lambda item: -item[1])),
        "top_operators": [
            {
                "operator": name,
                "self_cpu_seconds_per_step": op["self_cpu_seconds"] / steps,
                "calls_per_step": op["calls"] / steps,
            }
            for name, op in top
        ],
        "operators": profile["operators"],
    }


REDUCTION_BUCKET = "gradient reduction (ZeRO-3 hooks)"


def balance(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """How evenly the ranks were loaded over the profiled steps.

    - ``positions_max_over_mean``: per step, the busiest rank's token positions (padding included) over the ranks'
      mean, averaged over the steps;
    - ``reduction_hook_seconds_per_step``: per rank, and their mean, the time in ZeRO-3's gradient-reduction hooks.
      A rank that finishes a layer's backward first waits in that layer's reduction for the other, so this time is
      the reductions' own work plus the waiting. The profiler sums operators over the profiled steps, and which
      rank is the busier changes from step to step, so the ranks' compute totals cannot show the wait; the hooks do.
    """
    per_step = list(zip(*(rank["positions_per_step"] for rank in ranks)))
    ratios = [max(step) / (sum(step) / len(step)) for step in per_step if sum(step)]
    hooks = [rank["seconds_per_step"].get(REDUCTION_BUCKET, 0.0) for rank in ranks]
    return {
        "positions_max_over_mean": sum(ratios) / len(ratios) if ratios else 1.0,
        "reduction_hook_seconds_per_rank": hooks,
        "reduction_hook_seconds_per_step": sum(hooks) / len(hooks),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--training-dataset", default=default_dataset())
    parser.add_argument("--train-records", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=6, help="records per optimizer step, over all ranks")
    parser.add_argument("--profile-steps", default="3:4", help="FIRST:COUNT optimizer steps to profile")
    parser.add_argument("--arms", default="original,ours")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "profile_launcher.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    options = parse_args(argv)
    launch_options = throughput_deepspeed_args(["--model", options.model, "--batch-size", str(options.batch_size)])
    threads_per_rank = str(max(1, len(os.sched_getaffinity(0)) // launch_options.ranks))
    train, _ = split_records(
        options.training_dataset, launch_options.eval_records, options.train_records, launch_options.seed
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        data = scratch / "records.jsonl"
        data.write_text("".join(json.dumps(record) + "\n" for record in train))
        for variant in options.variants.split(","):
            flags, env = VARIANTS[variant]
            env = {key: value.format(threads_per_rank=threads_per_rank) for key, value in env.items()}
            for arm in options.arms.split(","):
                logger.info("Profiling %s, %s", arm, variant)
                launch = scratch / f"launch-{len(results)}"
                env_with_profile = {**env, "DOLLY_PROFILE": f"{options.profile_steps}:{launch / 'profiles'}"}
                run = launch_arm(
                    arm,
                    launch_options,
                    data,
                    launch / "out",
                    module="bench.profiled_trainer",
                    extra=flags,
                    env=env_with_profile,
                )
                ranks = [
                    summarize(json.loads(path.read_text())) for path in sorted((launch / "profiles").glob("rank*.json"))
                ]
                results[f"{arm}, {variant}"] = {
                    "arm": arm,
                    "variant": variant,
                    "env": env,
                    **run,
                    "ranks": ranks,
                    "balance": balance(ranks),
                }
    payload = {
        **result_header("bench.profile_launcher", argv),
        "model": options.model,
        "train_records": len(train),
        "batch_size": options.batch_size,
        "profiled_steps": options.profile_steps,
        "runs": results,
    }
    write_json(options.out, payload)
    for name, run in results.items():
        rank0 = run["ranks"][0]
        buckets = ", ".join(f"{bucket} {seconds:.2f}" for bucket, seconds in rank0["seconds_per_step"].items())
        print(
            f"{name}: {run['useful_tokens_per_second']:.1f} useful tok/s; rank 0 step {rank0['step_seconds']:.2f} s "
            f"({rank0['intra_op_threads']} threads): {buckets}"
        )
    return payload


if __name__ == "__main__":
    main()
