"""The trainer as users run it: the CLI, under the DeepSpeed launcher (and in this process, one rank, for the trainer's
own logic), then the saved model through a pipeline."""

import json

import pytest
from helpers import (
    PROJECT_ROOT,
    assert_finished,
    assert_ok,
    invoke_trainer,
    max_weight_difference,
    quick_training_args,
    run_example,
)
from transformers import pipeline

from training.rank.checkpoints import COMPLETE_MARKER
from training.trainer import parse_test_size


@pytest.mark.smoke
def test_deepspeed_zero3_two_cpu_ranks_train_save_and_answer(zero3_run, capsys, monkeypatch):
    out, result = zero3_run.out, zero3_run.result  # deepspeed --num_gpus 2 --module training.trainer (conftest)
    assert "--deepspeed" in zero3_run.args
    assert_ok(result)
    log = result.stdout + result.stderr
    assert "eval_loss" in log
    # Both ranks take part; the launcher reports each one's exit.
    assert log.count("exits successfully") == 2
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # The two CPU ranks split the data: 33 training records, 4 per rank per step, so an epoch is 5 steps (17 records
    # per rank); ranks that each read every record would need 9 steps.
    assert "Train data size: 33" in log
    assert state["epoch"] == pytest.approx(4 / 5)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "instruct_pipeline.py",
    ):
        assert (out / name).exists(), name
    assert not (out / ".staging-final").exists()

    generator = pipeline(model=str(out), trust_remote_code=True)
    assert type(generator).__name__ == "InstructionTextGenerationPipeline"
    answer = generator("Name a colour.", max_new_tokens=8, do_sample=False)
    assert isinstance(answer, list) and isinstance(answer[0]["generated_text"], str)
    # The dolly-v2 README's calls: bf16 on A100s, fp16 on V100s. Its 8-bit call passed model_kwargs={'load_in_8bit':
    # True}; transformers 5 removed that argument from from_pretrained, so the README gives its replacement.
    import torch
    from transformers import BitsAndBytesConfig

    for kwargs in (
        {"torch_dtype": torch.bfloat16},
        {"torch_dtype": torch.float16},
        {"model_kwargs": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}},
    ):
        dolly_call = pipeline(model=str(out), trust_remote_code=True, device_map="auto", **kwargs)
        assert isinstance(dolly_call("Name a colour.", max_new_tokens=4)[0]["generated_text"], str), kwargs
    generation_config = json.loads((out / "generation_config.json").read_text())
    end_id = generator.tokenizer.convert_tokens_to_ids("### End")
    assert end_id in generation_config["eos_token_id"]

    # The examples answer with any trained model folder.
    for example in ("generation.py", "pipeline.py"):
        assert run_example(example, str(out), capsys=capsys, monkeypatch=monkeypatch).count("Instruction:") == 2


def test_existing_output_is_not_overwritten_and_resume_continues(tiny_model_dir, sample_path, tmp_path):
    out = tmp_path / "out"
    assert_finished(invoke_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--max-steps", "2")))
    assert (out / "checkpoint-2" / COMPLETE_MARKER).exists()
    weights_before = (out / "model.safetensors").read_bytes()

    again = invoke_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--max-steps", "2"))
    assert again.exit_code != 0
    assert "is not empty; pass --resume" in again.log
    assert (out / "model.safetensors").read_bytes() == weights_before

    (out / "checkpoint-9").mkdir()  # an interrupted save: never marked complete
    resumed = invoke_trainer(quick_training_args(tiny_model_dir, sample_path, out, "--resume"))
    assert_finished(resumed)
    log = resumed.log
    assert f"Removing incomplete checkpoint {out / 'checkpoint-9'}" in log
    assert f"Resuming from {out / 'checkpoint-2'}" in log
    # Only steps 3 and 4 ran: one training-loss line each (a run that restarted would log four).
    assert log.count("{'loss':") == 2, log[-3000:]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]


def test_no_packing_falls_back_to_padded_batches_and_dbfs_gets_a_copy(tiny_model_dir, sample_path, tmp_path):
    out, dbfs = tmp_path / "out", tmp_path / "dbfs" / "run"
    result = invoke_trainer(
        quick_training_args(
            tiny_model_dir, sample_path, out, "--max-steps", "2", "--no-packing", "--dbfs-output-dir", str(dbfs)
        )
    )
    assert_finished(result)
    assert "Batching with DataCollatorForCompletionOnlyLM" in result.log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    from training.folder_commit import MARKER_NAME, is_complete

    copied = sorted(p.name for p in dbfs.iterdir())
    assert copied == sorted([MARKER_NAME, *(p.name for p in out.iterdir() if not p.name.startswith("checkpoint-"))])
    assert is_complete(dbfs) and not list(dbfs.parent.glob(".building-*"))  # staged, marked, moved into place
    assert (dbfs / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    packed = invoke_trainer(quick_training_args(tiny_model_dir, sample_path, tmp_path / "packed", "--max-steps", "1"))
    assert_finished(packed)
    assert "Batching with DataCollatorForPackedCompletionOnlyLM" in packed.log


def test_bad_record_stops_the_cli_with_file_line_and_field(tiny_model_dir, sample_path, tmp_path):
    data = tmp_path / "bad.jsonl"
    lines = sample_path.read_text().splitlines()[:5] + ['{"instruction": "x", "response": 5}']
    data.write_text("\n".join(lines) + "\n")
    result = invoke_trainer(quick_training_args(tiny_model_dir, data, tmp_path / "out"))
    assert result.exit_code != 0
    assert f"{data}, line 6: field 'response' must be a string, got int" in result.log


def test_a_test_size_that_leaves_nothing_to_train_on_stops_before_the_model_loads(
    tiny_model_dir, sample_path, tmp_path
):
    # Checked against the prepared data (read once per run), not by a second read in the command line.
    result = invoke_trainer(quick_training_args(tiny_model_dir, sample_path, tmp_path / "out", "--test-size", "41"))
    assert result.exit_code == 1, result.log
    assert "Error: --test-size 41: 41 records held out leaves none to train on (the data has 41)" in result.log
    assert "Loading model" not in result.log
    # Nothing of the run is left that a corrected command would trip over.
    rerun = invoke_trainer(quick_training_args(tiny_model_dir, sample_path, tmp_path / "out"))
    assert_finished(rerun)


@pytest.mark.parametrize("value, expected", [("1000", 1000), ("0.1", 0.1), ("0", 0)])
def test_test_size_is_a_count_or_a_ratio(value, expected):
    assert parse_test_size(value) == expected


@pytest.mark.parametrize("value", ["-1", "2.5"])
def test_test_size_rejects_nonsense(value):
    with pytest.raises(ValueError):
        parse_test_size(value)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--lr", "0"], "Invalid value for '--lr': must be above 0, got 0.0"),
        (["--lr", "-1e-5"], "Invalid value for '--lr': must be above 0"),
        (["--deepspeed", "missing_config.json"], "Invalid value for '--deepspeed': missing_config.json: no such file"),
        (["--deepspeed", "README.md"], "Invalid value for '--deepspeed': README.md: not valid JSON"),
        (["--test-size", "2.5"], "Invalid value for '--test-size': must be a whole count or a ratio below 1"),
        (["--test-size", "4", "--max-length", "8"], "Invalid value for '--max-length': 8 is below the"),
        (["--per-device-train-batch-size", "0"], "Invalid value for '--per-device-train-batch-size'"),
    ],
)
def test_bad_option_values_stop_before_anything_starts_naming_the_option(
    tiny_model_dir, sample_path, tmp_path, extra, expected, monkeypatch
):
    from click.testing import CliRunner

    from training.trainer import main

    monkeypatch.chdir(PROJECT_ROOT)
    args = [
        "--input-model",
        str(tiny_model_dir),
        "--training-dataset",
        str(sample_path),
        "--local-output-dir",
        str(tmp_path / "out"),
        *extra,
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_resume_from_the_last_steps_checkpoint_publishes_the_trained_weights_without_training_more(
    tiny_model_dir, sample_path, tmp_path
):
    """A run stopped while it published resumes from its last step's checkpoint: no step more (the Trainer would run
    the epoch's next one: --max-steps ends this run inside its epoch), and every trained weight, the GPT-NeoX output
    layer included (the Trainer's own checkpoint load skips it: save_pretrained stores it as embed_out)."""
    import shutil

    out = tmp_path / "out"
    args = quick_training_args(tiny_model_dir, sample_path, out, "--no-mlflow", "--eval-answers", "0")
    assert_finished(invoke_trainer(args))
    published = tmp_path / "published.safetensors"
    shutil.copy(out / "model.safetensors", published)
    for name in ("config.json", "model.safetensors"):  # as a publish cut short leaves the folder: not finished
        (out / name).unlink()
    resumed = invoke_trainer([*args, "--resume"])
    assert_finished(resumed)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert not (out / "checkpoint-5").exists()
    assert max_weight_difference(published, out / "model.safetensors") == 0.0
