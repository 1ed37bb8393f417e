"""The benchmark scripts run end to end on a tiny model, so they cannot rot (no figures are asserted here)."""

import json

import pytest

from bench import memory, quality, report, throughput

pytestmark = pytest.mark.slow


def test_quality_quick(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "quality.json"
    quality.main(["--quick", "--input-model", str(tiny_model_dir), "--training-dataset", str(sample_path), "--out", str(out)])
    result = json.loads(out.read_text())
    for key in ("model", "train_records", "eval_records", "steps", "eval_loss_before", "eval_loss_after",
                "stop_rate_before", "stop_rate_after", "per_category", "seconds"):
        assert key in result, key
    assert result["quick"] is True and result["steps"] == 3
    assert 0 <= result["stop_rate_after"] <= 1
    assert (tmp_path / "quality_loss.png").stat().st_size > 0


def test_throughput_and_memory_small(tiny_model_dir, sample_path, tmp_path):
    common = ["--model", str(tiny_model_dir), "--training-dataset", str(sample_path), "--train-records", "12",
              "--batch-size", "4"]
    speed = throughput.main(common + ["--eval-records", "4", "--out", str(tmp_path / "throughput.json")])
    assert set(speed["arms"]) == {"original", "trl", "ours"}
    assert speed["arms"]["ours"]["padding_fraction"] == 0
    assert speed["arms"]["original"]["padding_fraction"] > 0
    assert speed["arms"]["ours"]["useful_tokens"] == speed["arms"]["original"]["useful_tokens"]
    assert {"ratio_vs_original", "ratio_vs_trl", "eval_loss"} <= set(speed)
    assert (tmp_path / "throughput.png").exists()

    mem = memory.main(common + ["--arms", "full,lora", "--out", str(tmp_path / "memory.json")])
    for arm in ("full", "lora"):
        assert mem[arm]["peak_memory_bytes"] > 0 and mem[arm]["tokens_per_second"] > 0
    assert mem["lora"]["trainable_parameters"] < mem["full"]["trainable_parameters"]

    readme = "a\n<!-- bench:throughput -->\nold\n<!-- /bench:throughput -->\n<!-- bench:quality -->\n<!-- /bench:quality -->\n"
    rendered = report.render(readme, results_dir=tmp_path)
    assert "old" not in rendered and "useful tokens/s" in rendered
    assert "<!-- bench:quality -->\n<!-- /bench:quality -->" in rendered  # no result file, no figures


def test_launcher_exits_one_run(tiny_model_dir, tmp_path):
    from bench import launcher_exits

    out = tmp_path / "launcher_exits.json"
    result = launcher_exits.main(["--runs", "1", "--model", str(tiny_model_dir), "--out", str(out)])
    assert result["total"] == 1 and len(result["runs"][0]["rank_exit_codes"]) == 2
    assert json.loads(out.read_text())["zero_exits_with_model"] == result["zero_exits_with_model"]
    rendered = report.render("<!-- bench:launcher_exits -->\n<!-- /bench:launcher_exits -->\n", results_dir=tmp_path)
    assert "launches of `deepspeed --num_gpus 2`" in rendered


def test_throughput_under_the_deepspeed_launcher_small(tiny_model_dir, sample_path, tmp_path):
    from bench import throughput_deepspeed

    out = tmp_path / "throughput_deepspeed.json"
    result = throughput_deepspeed.main(["--model", str(tiny_model_dir), "--training-dataset", str(sample_path),
                                        "--train-records", "12", "--eval-records", "4", "--batch-size", "4",
                                        "--out", str(out)])
    arms = result["arms"]
    assert set(arms) == {"original", "ours"} and arms["ours"]["optimizer_steps"] == arms["original"]["optimizer_steps"] == 3
    # The same records: the same useful tokens counted by the Trainer, padded or packed.
    assert arms["ours"]["useful_tokens"] == arms["original"]["useful_tokens"] > 0
    assert result["ratio_vs_original"] > 0 and json.loads(out.read_text())["ranks"] == 2
    rendered = report.render("<!-- bench:throughput_deepspeed -->\n<!-- /bench:throughput_deepspeed -->\n",
                             results_dir=tmp_path)
    assert "ours / original under the launcher" in rendered


def test_scaling_sweeps_records_and_lengths(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    from bench import scaling

    # Each point in this process (bench.common.run_in_own_process is exercised by the throughput test above).
    monkeypatch.setattr(scaling, "run_in_own_process",
                        lambda module, args: throughput.run_arm("ours", throughput.parse_args(args)))
    out = tmp_path / "scaling.json"
    result = scaling.main(["--model", str(tiny_model_dir), "--training-dataset", str(sample_path), "--batch-size", "4",
                           "--records", "8,16", "--length-for-records", "512", "--max-lengths", "128,512",
                           "--records-for-lengths", "16", "--out", str(out)])
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
