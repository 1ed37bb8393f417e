"""The trainer as users run it: the CLI, under the DeepSpeed launcher, then the saved model through a pipeline."""

import json
import subprocess
import sys

import pytest
from helpers import PROJECT_ROOT, quick_training_args, run_trainer, subprocess_env
from transformers import pipeline

from training.checkpoints import COMPLETE_MARKER
from training.trainer import parse_test_size

pytestmark = pytest.mark.slow


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_deepspeed_zero3_two_cpu_ranks_train_save_and_answer(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "out"
    args = quick_training_args(tiny_model_dir, sample_path, out, "--deepspeed", str(PROJECT_ROOT / "config/cpu_config.json"))
    result = run_trainer(args, deepspeed_ranks=2)
    assert_ok(result)
    log = result.stdout + result.stderr
    assert "eval_loss" in log
    # Both ranks take part; the launcher reports each one's exit.
    assert log.count("exits successfully") == 2
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "instruct_pipeline.py"):
        assert (out / name).exists(), name
    assert not (out / ".staging-final").exists()

    generator = pipeline(model=str(out), trust_remote_code=True)
    assert type(generator).__name__ == "InstructionTextGenerationPipeline"
    answer = generator("Name a colour.", max_new_tokens=8, do_sample=False)
    assert isinstance(answer, list) and isinstance(answer[0]["generated_text"], str)
    generation_config = json.loads((out / "generation_config.json").read_text())
    end_id = generator.tokenizer.convert_tokens_to_ids("### End")
    assert end_id in generation_config["eos_token_id"]

    # The examples answer with any trained model folder.
    for example in ("generation.py", "pipeline.py"):
        ran = subprocess.run([sys.executable, str(PROJECT_ROOT / "examples" / example), str(out)], cwd=PROJECT_ROOT,
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert ran.stdout.count("Instruction:") == 2


def test_existing_output_is_not_overwritten_and_resume_continues(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "out"
    assert_ok(run_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--max-steps", "2")))
    assert (out / "checkpoint-2" / COMPLETE_MARKER).exists()
    weights_before = (out / "model.safetensors").read_bytes()

    again = run_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--max-steps", "2"))
    assert again.returncode != 0
    assert "is not empty; pass --resume" in again.stderr
    assert (out / "model.safetensors").read_bytes() == weights_before

    (out / "checkpoint-9").mkdir()  # an interrupted save: never marked complete
    resumed = run_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--resume"))
    assert_ok(resumed)
    log = resumed.stdout + resumed.stderr
    assert f"Removing incomplete checkpoint {out / 'checkpoint-9'}" in log
    assert f"Resuming from {out / 'checkpoint-2'}" in log
    # Only steps 3 and 4 ran: one training-loss line each (a run that restarted would log four).
    assert log.count("{'loss':") == 2, log[-3000:]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]


def test_bad_record_stops_the_cli_with_file_line_and_field(tiny_model_dir, sample_path, tmp_path):
    data = tmp_path / "bad.jsonl"
    lines = sample_path.read_text().splitlines()[:5] + ['{"instruction": "x", "response": 5}']
    data.write_text("\n".join(lines) + "\n")
    result = run_trainer(quick_training_args(tiny_model_dir, data, tmp_path / "out"))
    assert result.returncode != 0
    assert f"{data}, line 6: field 'response' must be a string, got int" in result.stderr


@pytest.mark.parametrize("value, expected", [("1000", 1000), ("0.1", 0.1), ("0", 0)])
def test_test_size_is_a_count_or_a_ratio(value, expected):
    assert parse_test_size(value) == expected


@pytest.mark.parametrize("value", ["-1", "2.5"])
def test_test_size_rejects_nonsense(value):
    with pytest.raises(ValueError):
        parse_test_size(value)
