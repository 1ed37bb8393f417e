"""The benchmark scripts run end to end on a tiny model, so they cannot rot (no figures are asserted here)."""

import json
import os

import pytest

from bench import common as common_module
from bench import memory, quality, report, throughput


def test_quality_quick(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "quality.json"
    quality.main(
        ["--quick", "--input-model", str(tiny_model_dir), "--training-dataset", str(sample_path), "--out", str(out)]
    )
    result = json.loads(out.read_text())
    for key in (
        "model",
        "train_records",
        "eval_records",
        "steps",
        "eval_loss_before",
        "eval_loss_after",
        "stop_rate_before",
        "stop_rate_after",
        "per_category",
        "seconds",
    ):
        assert key in result, key
    assert result["quick"] is True and result["steps"] == 3
    assert 0 <= result["stop_rate_after"] <= 1
    assert (tmp_path / "quality_loss.png").stat().st_size > 0


def arms_in_this_process(module: str, args: list[str]) -> dict:
    """bench.common.run_in_own_process, without the new interpreter (for the tests' speed; the hop itself is tested
    below, with an arm that measures nothing)."""
    import importlib

    bench = importlib.import_module(module)
    return bench.run_arm(args[args.index("--run-arm") + 1], bench.parse_args(args))


def test_throughput_and_memory_small(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    common = [
        "--model",
        str(tiny_model_dir),
        "--training-dataset",
        str(sample_path),
        "--train-records",
        "12",
        "--batch-size",
        "4",
    ]
    with monkeypatch.context() as patch:
        patch.setattr(common_module, "run_in_own_process", arms_in_this_process)
        speed = throughput.main(common + ["--eval-records", "4", "--out", str(tmp_path / "throughput.json")])
        mem = memory.main(common + ["--arms", "full,lora", "--out", str(tmp_path / "memory.json")])
    assert set(speed["arms"]) == {"original", "trl", "ours"}
    assert speed["arms"]["ours"]["padding_fraction"] == 0
    assert speed["arms"]["original"]["padding_fraction"] > 0
    assert speed["arms"]["ours"]["useful_tokens"] == speed["arms"]["original"]["useful_tokens"]
    assert {"ratio_vs_original", "ratio_vs_trl", "eval_loss"} <= set(speed)
    assert (tmp_path / "throughput.png").exists()
    ours = speed["arms"]["ours"]
    assert len(ours["step_seconds"]) == ours["optimizer_steps"] and min(ours["step_seconds"]) > 0

    for arm in ("full", "lora"):
        assert mem[arm]["peak_memory_bytes"] > 0 and mem[arm]["tokens_per_second"] > 0
    assert mem["lora"]["trainable_parameters"] < mem["full"]["trainable_parameters"]

    readme = "a\n<!-- bench:throughput -->\nold\n<!-- /bench:throughput -->\n<!-- bench:quality -->\n<!-- /bench:quality -->\n"
    rendered = report.render(readme, results_dir=tmp_path)
    assert "old" not in rendered and "useful tokens/s" in rendered
    assert "<!-- bench:quality -->\n<!-- /bench:quality -->" in rendered  # no result file, no figures


def test_the_compile_trial_compares_steady_steps_after_the_warmup(tmp_path):
    def arm(steps: list[float], tokens_per_second: float, loss: float) -> dict:
        return {
            "step_seconds": steps,
            "useful_tokens_per_second": tokens_per_second,
            "eval_loss": loss,
            "train_records": 12,
        }

    eager, compiled = arm([2.0, 1.0, 1.0, 1.0, 1.2, 0.9], 100.0, 2.5), arm([60.0, 30.0, 1.0, 0.5, 0.6, 40.0], 20.0, 2.5)
    comparison = throughput.compile_comparison(eager, compiled, warmup_steps=3)
    # Medians of steps 4-6: eager 1.0 s, compiled 0.6 s (the recompile at the last step does not move the median).
    assert comparison["steady_step_speedup"] == pytest.approx(1.0 / 0.6)
    assert comparison["whole_training_speedup"] == pytest.approx(0.2)
    assert comparison["first_step_seconds"] == {"ours": 2.0, "ours_compiled": 60.0}
    result = {
        "command": "python -m bench.throughput --arms ours,ours_compiled",
        "machine": "test",
        "model": "pythia-tiny",
        "batch_size": 4,
        "arms": {"ours": eager, "ours_compiled": compiled},
        "compile": comparison,
    }
    (tmp_path / "compile.json").write_text(json.dumps(result))
    rendered = report.render("<!-- bench:compile -->\n<!-- /bench:compile -->\n", results_dir=tmp_path)
    assert "steady steps: **1.67x**" in rendered and "whole epoch: **0.20x**" in rendered


def test_an_arm_runs_in_its_own_process_and_returns_its_result(monkeypatch):
    from helpers import TEST_DIR

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TEST_DIR), os.environ.get("PYTHONPATH", "")]))
    result = common_module.run_in_own_process("arm_stub", ["--run-arm", "ours", "--batch-size", "4"])
    assert result["args"] == ["--run-arm", "ours", "--batch-size", "4"] and result["pid"] != os.getpid()


@pytest.mark.launch
def test_launcher_exits_one_run(tiny_model_dir, tmp_path):
    from bench import launcher_exits

    out = tmp_path / "launcher_exits.json"
    result = launcher_exits.main(["--runs", "1", "--model", str(tiny_model_dir), "--out", str(out)])
    assert result["total"] == 1 and len(result["runs"][0]["rank_exit_codes"]) == 2
    assert json.loads(out.read_text())["zero_exits_with_model"] == result["zero_exits_with_model"]
    rendered = report.render("<!-- bench:launcher_exits -->\n<!-- /bench:launcher_exits -->\n", results_dir=tmp_path)
    assert "launches of `deepspeed --num_gpus 2`" in rendered


@pytest.mark.launch
def test_throughput_under_the_deepspeed_launcher_small(tiny_model_dir, sample_path, tmp_path):
    from bench import throughput_deepspeed

    out = tmp_path / "throughput_deepspeed.json"
    result = throughput_deepspeed.main(
        [
            "--model",
            str(tiny_model_dir),
            "--training-dataset",
            str(sample_path),
            "--train-records",
            "12",
            "--eval-records",
            "4",
            "--batch-size",
            "4",
            "--runs",
            "original:unbalanced,ours:balanced",
            "--out",
            str(out),
        ]
    )
    arms = result["arms"]
    original, ours = arms["original, unbalanced"], arms["ours, balanced"]
    assert list(arms) == ["original, unbalanced", "ours, balanced"]
    assert ours["optimizer_steps"] == original["optimizer_steps"] == 3
    assert "--no-balance-ranks" in original["flags"] and "--no-balance-ranks" not in ours["flags"]
    # The same records: the same useful tokens counted by the Trainer, padded or packed, balanced or not.
    assert ours["useful_tokens"] == original["useful_tokens"] > 0
    assert set(result["ratios"]) == {"ours / Dolly's recipe"} and result["ratio_vs_original"] > 0
    assert json.loads(out.read_text())["ranks"] == 2
    rendered = report.render(
        "<!-- bench:throughput_deepspeed -->\n<!-- /bench:throughput_deepspeed -->\n", results_dir=tmp_path
    )
    assert "ours / Dolly's recipe under the launcher" in rendered


def test_scaling_sweeps_records_and_lengths(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    from bench import scaling

    # Each point in this process (bench.common.run_in_own_process is tested above).
    monkeypatch.setattr(
        scaling, "run_in_own_process", lambda module, args: throughput.run_arm("ours", throughput.parse_args(args))
    )
    out = tmp_path / "scaling.json"
    result = scaling.main(
        [
            "--model",
            str(tiny_model_dir),
            "--training-dataset",
            str(sample_path),
            "--batch-size",
            "4",
            "--records",
            "8,16",
            "--length-for-records",
            "512",
            "--max-lengths",
            "128,512",
            "--records-for-lengths",
            "16",
            "--out",
            str(out),
        ]
    )
    by_records = result["records_sweep"]
    assert [p["records"] for p in by_records] == [8, 16] and by_records[0]["train_records"] == 8
    assert by_records[1]["train_records"] == 16 and by_records[1]["useful_tokens"] > by_records[0]["useful_tokens"]
    short, long = result["length_sweep"]
    assert long == by_records[1]  # the shared point is measured once
    # A shorter max length drops the longer records, as the trainer does, and so shrinks the largest step.
    assert short["train_records"] < long["train_records"]
    assert short["largest_batch_positions"] < long["largest_batch_positions"]
    for point in by_records + [short]:
        assert point["useful_tokens"] == point["record_tokens"]  # packing pads nothing
        assert point["optimizer_steps"] == -(-point["train_records"] // 4)
    assert json.loads(out.read_text())["records_sweep"] == by_records and out.with_suffix(".png").stat().st_size > 0
    rendered = report.render("<!-- bench:scaling -->\n<!-- /bench:scaling -->\n", results_dir=tmp_path)
    assert "| 16 | 128 |" in rendered and "largest step" in rendered


def test_the_gpu_check_runs_dry_on_cpu(tmp_path, monkeypatch):
    """bench.gpu_check's four parts on CPU, each written as it finishes: exactness with the reference varlen kernel in
    the CUDA kernel's place, the trainer CLI under deepspeed --num_gpus 1 (ZeRO-3, packed) answered through the
    pipeline, every throughput arm with MFU against the measured matrix rate and ours' costliest ops, host waits."""
    from bench import gpu_check

    monkeypatch.setattr(common_module, "run_in_own_process", arms_in_this_process)
    out = tmp_path / "parts"
    result = gpu_check.main(["run", "--dry-run", "--out-dir", str(out)])
    for family in ("gpt_neox", "llama_gqa"):
        errors = result["exactness"][family]
        assert errors["kernel"].startswith("torch_varlen_attn")
        for pair in ("kernel_vs_per_record", "kernel_vs_unpacked_sdpa", "per_record_vs_unpacked_sdpa"):
            assert errors[pair]["output"] < 1e-5 and errors[pair]["gradient"] < 1e-4, (family, pair, errors)
    trainer = result["trainer_run"]
    assert trainer["exit_code"] == 0 and trainer["steps"] == 2 and len(trainer["losses"]) == 2
    assert trainer["world_size"] == 1 and trainer["zero_stage"] == 3 and trainer["precision"] == "fp32"
    assert trainer["attention"] == "per_record_sdpa" and isinstance(trainer["answer"], str)
    assert trainer["packing_self_check"].startswith("Packing self-check passed")
    assert result["host_waits"]["measured"] is False and "no CUDA" in result["host_waits"]["reason"]
    speed = result["speed"]
    assert set(speed["arms"]) == {"original", "trl", "ours"} and result["gpu"] is None
    assert speed["matrix_rate_flops"] > 0 and all(a["mfu_vs_measured_matrix_rate"] > 0 for a in speed["arms"].values())
    assert speed["arms"]["ours"]["attention"].startswith("per_record_sdpa")
    assert len(speed["ours_costliest_kernels"]) == 10 and speed["ours_costliest_kernels"][0]["ms"] > 0
    # Each part was written on its own, and the whole so far beside them.
    for part in ("exactness", "trainer_run", "host_waits", "speed"):
        assert "part_seconds" in json.loads((out / f"{part}.json").read_text())
    assert json.loads((out / "gpu_check.json").read_text())["dry_run"] is True


def test_a_gpu_check_part_that_does_not_fit_the_budget_is_skipped_and_said(tmp_path):
    import time

    from bench.gpu_check import PartWriter

    parts = PartWriter(tmp_path, {"dry_run": True}, budget=5, started=time.monotonic())
    parts.run("quick", 1, lambda left: {"left": left})
    parts.run("long", 60, lambda left: pytest.fail("a part that cannot fit must not start"))
    parts.run("broken", 0, lambda left: 1 / 0)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert 0 < written["quick"]["left"] <= 5 and "the part needs ~60 s" in written["long"]["skipped"]
    assert written["broken"]["error"].startswith("ZeroDivisionError")


def test_the_gpu_check_ships_one_bundle_a_command_can_carry_or_refuses(tmp_path):
    import tarfile

    from bench.gpu_check import PRESENT_ON_THE_MACHINE, bundle

    wheels = []
    for name, size in (("big", 5000), ("small", 1500)):
        wheel = tmp_path / f"{name}-1.0-py3-none-any.whl"
        wheel.write_bytes(os.urandom(size))  # incompressible, as zipped wheels are
        wheels.append(wheel)
    archive = bundle(wheels, tmp_path, limit=8000)
    with tarfile.open(archive) as opened:
        assert sorted(opened.getnames()) == sorted(wheel.name for wheel in wheels)
    with pytest.raises(SystemExit, match=r"over 0 MiB; largest: big-1.0-py3-none-any.whl"):
        bundle(wheels, tmp_path, limit=4000)
    assert not archive.exists()
    # What the GPU machine already has is never shipped.
    assert {"torch", "pyarrow", "pandas", "tokenizers", "safetensors", "peft", "accelerate"} <= set(
        PRESENT_ON_THE_MACHINE
    )


def test_the_launcher_profile_reads_the_wait_from_the_reduction_hooks(tmp_path):
    from bench import profile_launcher

    def rank(positions: list[int], hook_seconds: float, matmul_seconds: float) -> dict:
        steps = len(positions)
        return profile_launcher.summarize(
            {
                "steps": [1, steps],
                "wall_seconds": steps * (hook_seconds + matmul_seconds + 0.5),
                "intra_op_threads": 2,
                "positions_per_step": positions,
                "operators": {
                    "torch::autograd::AccumulateGrad": {"self_cpu_seconds": steps * hook_seconds, "calls": 10},
                    "aten::mm": {"self_cpu_seconds": steps * matmul_seconds, "calls": 10},
                },
            }
        )

    # Unbalanced: which rank is the busier alternates, so the ranks' totals are equal, yet each waits in the hooks.
    unbalanced = [rank([300, 100], 2.0, 4.0), rank([100, 300], 2.2, 4.0)]
    balanced = [rank([200, 200], 1.0, 4.0), rank([200, 200], 1.0, 4.0)]
    summary = profile_launcher.balance(unbalanced)
    assert summary["positions_max_over_mean"] == pytest.approx(1.5)
    assert summary["reduction_hook_seconds_per_step"] == pytest.approx(2.1)
    assert profile_launcher.balance(balanced)["positions_max_over_mean"] == 1.0

    def run(variant: str, ranks: list[dict]) -> dict:
        return {
            "variant": variant,
            "useful_tokens_per_second": 10.0,
            "ranks": ranks,
            "balance": profile_launcher.balance(ranks),
        }

    result = {
        "command": "python -m bench.profile_launcher",
        "machine": "test",
        "model": "pythia-tiny",
        "train_records": 8,
        "batch_size": 4,
        "profiled_steps": "1:2",
        "runs": {"ours, unbalanced": run("unbalanced", unbalanced), "ours, as shipped": run("as shipped", balanced)},
    }
    (tmp_path / "profile_launcher.json").write_text(json.dumps(result))
    rendered = report.render(
        "<!-- bench:profile_launcher -->\n<!-- /bench:profile_launcher -->\n", results_dir=tmp_path
    )
    assert "| ours, unbalanced | 1.500 | 2.10 s | 1.10 s |" in rendered
    assert "| ours, as shipped | 1.000 | 1.00 s | 0.00 s |" in rendered


@pytest.mark.launch
def test_data_scale_prepares_for_a_two_rank_launch_and_reports(sample_path, tmp_path):
    from bench.data_scale import main
    from bench.report import data_scale_section

    output = tmp_path / "data_scale.json"
    results = main(["--sizes", "300", "--source", str(sample_path), "--output", str(output)])
    assert output.exists() and output.with_suffix(".png").exists()
    for size in ("300",):
        figures = results["sizes"][size]
        assert figures["preparation"]["records"] == int(size)
        assert figures["tokenizing_seconds_by_rank"]["1"] == 0  # only the preparing rank tokenizes
        assert {"launcher", "rank 0", "rank 1"} <= set(figures["peak_memory_bytes"])
    assert "| 300 |" in data_scale_section(json.loads(output.read_text()))


def test_the_rest_of_the_scale_bench_runs_small(tmp_path, monkeypatch):
    """bench.scale_rest at small sizes, its parts in this process (serving's batches are tested in test_serving.py):
    every part writes its figures; the source is read once per run; the old whole-file reader is the baseline."""
    from bench import scale_rest

    def in_this_process(module, args):
        result_file = tmp_path / "arm.json"
        scale_rest.main([*args, "--arm-result", str(result_file)])
        return json.loads(result_file.read_text())

    monkeypatch.setattr(scale_rest, "run_in_own_process", in_this_process)
    out = tmp_path / "scale_rest.json"
    result = scale_rest.main(["--records", "400", "--parts", "json,reads,sampler", "--out", str(out)])
    assert set(result["json"]["formats"]) == {"jsonl", "json_lines", "json_array", "json_array_whole_file_baseline"}
    assert all(f["rows"] == 400 and f["peak_rss_while_reading_bytes"] > 0 for f in result["json"]["formats"].values())
    runs = result["reads"]["runs"]
    assert runs["first"]["reads_of_the_source"] == runs["reusing"]["reads_of_the_source"] == 1.0
    assert runs["first"]["bytes_read_by_rank_0"] == runs["reusing"]["bytes_read_by_rank_0"] == 0
    assert set(result["sampler"]["ranks"]) == {"8", "64", "512"} and "serving" not in result
    assert json.loads(out.read_text())["sampler"] == result["sampler"]
