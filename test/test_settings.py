"""One place for a run's settings: one default each, the CLI, train() and the notebook agree, and a run's
run_config.json replays it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import PROJECT_ROOT, run_trainer

from training.consts import DEFAULT_INPUT_MODEL, DEFAULT_SEED, DEFAULT_TRAINING_DATASET
from training.driver.notebook import FINETUNING, GPU_FAMILIES, RunPaths, notebook_settings
from training.rank.run_record import RUN_CONFIG_NAME, read_run_config
from training.settings import (
    SettingsError,
    TrainSettings,
    command_line,
    given_settings,
    option_name,
    option_spec,
    setting_fields,
)
from training.trainer import main, train, training_arguments

CPU_CONFIG = str(PROJECT_ROOT / "config" / "cpu_config.json")

# Dolly's trainer CLI (databrickslabs/dolly, training/trainer.py): every option, with its default.
DOLLY_OPTIONS = {
    "--input-model": DEFAULT_INPUT_MODEL,
    "--local-output-dir": dataclasses.MISSING,
    "--dbfs-output-dir": None,
    "--epochs": 3,
    "--per-device-train-batch-size": 8,
    "--per-device-eval-batch-size": 8,
    "--test-size": 1000,
    "--warmup-steps": None,
    "--logging-steps": 10,
    "--eval-steps": 50,
    "--save-steps": 400,
    "--save-total-limit": 10,
    "--lr": 1e-5,
    "--seed": DEFAULT_SEED,
    "--deepspeed": None,
    "--training-dataset": DEFAULT_TRAINING_DATASET,
    "--gradient-checkpointing": True,
    "--local_rank": None,
    "--bf16": None,
}


def cli_params() -> dict[str, click.Parameter]:
    return {param.name: param for param in main.params}


def parse_cli(args: list[str]) -> click.Context:
    return main.make_context("trainer", list(args))


def test_dollys_options_keep_their_names_and_defaults():
    fields = {option_name(item): item.default for item in setting_fields()}
    for option, default in DOLLY_OPTIONS.items():
        assert option in fields, option
        assert fields[option] == default, option


def test_every_setting_is_one_cli_option_with_its_help_and_no_second_default():
    params = cli_params()
    assert set(params) == {item.name for item in setting_fields()} | {"config_file"}
    for item in setting_fields():
        param = params[item.name]
        assert option_spec(item).help, f"{item.name} has no help text"
        assert param.help.startswith(option_spec(item).help)
        assert option_name(item) in param.opts
        if option_spec(item).kind == "value":
            assert param.default is None, f"{param.opts}: a second default"  # unset values come from the dataclass
        else:
            assert param.default == item.default, param.opts
    # train() takes the settings (or Dolly's keywords for them) and defines no defaults of its own.
    signature = inspect.signature(train)
    assert [(p.name, p.kind, p.default) for p in signature.parameters.values()] == [
        ("settings", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
        ("kwargs", inspect.Parameter.VAR_KEYWORD, inspect.Parameter.empty),
    ]


def test_the_cli_and_train_agree_on_every_default(tmp_path):
    out = str(tmp_path / "out")
    ctx = parse_cli(["--local-output-dir", out])
    assert given_settings(ctx) == {"local_output_dir": out}
    assert TrainSettings(**given_settings(ctx)) == TrainSettings(local_output_dir=out)
    # Values left out on the command line are the dataclass's; parsed values are the field's type.
    parsed = parse_cli(
        [
            "--local-output-dir",
            out,
            "--test-size",
            "0.1",
            "--lora-target-modules",
            "query, dense",
            "--no-packing",
            "--bf16",
            "false",
        ]
    )
    settings = TrainSettings(**given_settings(parsed))
    assert settings == TrainSettings(
        local_output_dir=out, test_size=0.1, lora_target_modules=("query", "dense"), packing=False, bf16=False
    )
    assert settings.epochs == 3 and settings.lr == 1e-5


def test_train_checks_values_as_the_cli_does(tmp_path):
    with pytest.raises(SettingsError, match=r"lr \(--lr\): must be above 0, got 0"):
        train(local_output_dir=str(tmp_path / "a"), lr=0)
    with pytest.raises(SettingsError, match=r"deepspeed \(--deepspeed\): missing.json: no such file"):
        train(local_output_dir=str(tmp_path / "a"), deepspeed="missing.json")
    with pytest.raises(TypeError, match="epoch"):
        train(local_output_dir=str(tmp_path / "a"), epoch=1)  # a misspelt keyword is not silently ignored
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("finetuning", sorted(FINETUNING))
@pytest.mark.parametrize("family", sorted(GPU_FAMILIES))
def test_notebook_runs_are_overrides_that_the_cli_reads_back(family, finetuning):
    overrides = notebook_settings(
        input_model="m",
        gpu_family=family,
        finetuning=finetuning,
        paths=RunPaths("/local/x", "/dbfs/x", "/local/x/runs"),
    )
    ctx = parse_cli(command_line(overrides))
    expected = {name: value for name, value in overrides.items() if value is not None}
    assert given_settings(ctx) == expected
    assert TrainSettings(**given_settings(ctx)) == TrainSettings(**overrides)


def test_command_line_refuses_unknown_settings():
    with pytest.raises(SettingsError, match=r"unknown settings \['learning_rate'\]"):
        command_line({"learning_rate": 1e-4})


def test_bad_config_files_are_named(tmp_path):
    missing = tmp_path / "none.json"
    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"format": 1, "settings": {"lr": 1e-4, "learning_rate": 1}}))
    for path, message in (
        (missing, "no such file"),
        (not_json, "not a valid run_config.json"),
        (unknown, "unknown settings ['learning_rate']"),
    ):
        result = CliRunner().invoke(main, ["--config", str(path), "--local-output-dir", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert f"{path}: {message}" in result.output
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2 and "Missing option '--local-output-dir'" in result.output


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts).removesuffix(".__init__")


def module_imports(path: Path) -> set[str]:
    """The project modules a module imports at its top level (relative imports, resolved to full names)."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            if node.module:
                names.add(f"{base}.{node.module}")
            else:
                names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_training_modules_import_no_cycle():
    modules = {module_name(path): module_imports(path) for path in (PROJECT_ROOT / "training").rglob("*.py")}
    assert "training.rank.prepare" in modules and "training.saved_model.consts" in modules
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join(trail + (name,))}"
        if name in done:
            return
        for imported in modules.get(name, ()):
            visit(imported, trail + (name,))
        done.add(name)

    for name in modules:
        visit(name, ())


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.launch
def test_run_config_records_the_run_and_replays_it(zero3_run, sample_path, tmp_path):
    first, second, args, result = zero3_run.out, tmp_path / "second", zero3_run.args, zero3_run.result
    # DeepSpeed's CPU all-reduce segments (one per rank) are not left in /dev/shm (training/distributed.py).
    assert "deepspeed_shm_comm_op built successfully" in result.stdout + result.stderr  # the segments were made
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{zero3_run.port}_*"))

    record = json.loads((first / RUN_CONFIG_NAME).read_text())
    assert record["settings"]["local_output_dir"] == str(first) and record["settings"]["seed"] == 11
    assert record["settings"]["epochs"] == 3  # every setting, defaults included
    assert set(record["settings"]) == {item.name for item in setting_fields()}
    data = record["data"]
    assert {key: data[key] for key in ("training_dataset", "records", "within_max_length", "train_records")} == {
        "training_dataset": str(sample_path),
        "records": 41,
        "within_max_length": 41,
        "train_records": 33,
    }
    assert data["eval_records"] == 8 and Path(data["prepared_path"]).name == data["fingerprint"]
    assert set(data["fingerprint_parts"]) == {"source", "columns", "template", "tokenizer", "max_length", "seed"}
    assert record["resolved"]["world_size"] == 2 and record["resolved"]["precision"] == "fp32"
    assert record["resolved"]["attention"] == "per_record_sdpa"  # packed rows on CPU ranks
    used = record["resolved"]["deepspeed_config"]
    assert used["zero_optimization"]["stage"] == 3 and used["train_micro_batch_size_per_gpu"] == 4  # "auto" filled
    assert record["model"]["model_type"] == "gpt_neox" and record["model"]["parameters"] > 0
    assert {"python", "torch", "transformers", "deepspeed"} <= set(record["versions"])
    # Every checkpoint carries it, written before the checkpoint was marked complete.
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert json.loads((first / checkpoint / RUN_CONFIG_NAME).read_text())["settings"] == record["settings"]

    # The same TrainingArguments from the file as from the command line that made it (but the output folder).
    replayed = TrainSettings(**{**read_run_config(first / RUN_CONFIG_NAME), "local_output_dir": str(second)})
    original = TrainSettings(**given_settings(parse_cli(args)))
    assert dataclasses.replace(replayed, local_output_dir=str(first)) == original
    replayed_args = training_arguments(dataclasses.replace(replayed, deepspeed=None), "fp32").to_dict()
    original_args = training_arguments(dataclasses.replace(original, deepspeed=None), "fp32").to_dict()
    for folder_key in ("output_dir", "logging_dir"):
        replayed_args.pop(folder_key, None), original_args.pop(folder_key, None)
    assert replayed_args == original_args

    # Re-run from the record alone: the same weights.
    again = run_trainer(
        ["--config", str(first / RUN_CONFIG_NAME), "--local-output-dir", str(second)], ranks=2, launcher="deepspeed"
    )  # as the first run was launched: the record has its --local_rank
    assert again.returncode == 0, again.stderr[-5000:]
    second_record = json.loads((second / RUN_CONFIG_NAME).read_text())
    assert {**second_record["settings"], "local_output_dir": str(first)} == record["settings"]
    before, after = weights(first), weights(second)
    assert before.keys() == after.keys()
    assert max((before[name] - after[name]).abs().max().item() for name in before) <= 1e-6
