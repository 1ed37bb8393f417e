"""One place for a training run's settings.

Every option of ``python -m training.trainer`` is a field of :class:`TrainSettings`: its one default and its
``--help`` text are there (``setting(default, help=...)``). From the dataclass come

- the click options (:func:`click_options`), named and defaulted as Dolly's CLI has them;
- ``train(**kwargs)``: Dolly's keywords build the same dataclass, with the same checks as the command line;
- the notebook's GPU families and fine-tuning methods, written as overrides of it and turned into the trainer's
  flags by :func:`command_line`;
- ``run_config.json``, which records it, and ``--config``, which replays it (:mod:`training.rank.run_record`).

A value is checked once, by its field's ``check``: the CLI reports ``Invalid value for '--lr': must be above 0``,
``train(lr=0)`` raises :class:`SettingsError` naming the keyword and the option.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import click
from click.core import ParameterSource

from .columns import normalize_columns
from .saved_model.consts import DEFAULT_INPUT_MODEL, DEFAULT_SEED, DEFAULT_TRAINING_DATASET


class SettingsError(ValueError):
    """A setting's value, or a combination of settings, that cannot train."""


# ---- what a value must be (each raises ValueError with a message that reads after the option's name) ----


def above_zero(value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be above 0, got {value}")


def at_least_one(value: int) -> None:
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")


def not_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")


def json_object_file(value: str | None) -> None:
    """A DeepSpeed config must exist and hold a JSON object (DeepSpeed itself checks the keys)."""
    if value is None:
        return
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{value}: no such file")
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{value}: not valid JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{value}: expected a JSON object of DeepSpeed settings")


def registry_model_name(value: str) -> None:
    """A name MLflow's model registry takes: no '/' or ':'; a dotted name is Unity Catalog's catalog.schema.model,
    each part as Unity Catalog names must be (at most 255 characters, no space, '/', '.' or control characters)."""
    if not value.strip():
        raise ValueError("must not be empty")
    if "/" in value or ":" in value:
        raise ValueError(f"MLflow's registry refuses '/' and ':' in a model name, got {value!r}")
    if "." not in value:
        return
    parts = value.split(".")
    if len(parts) != 3:
        raise ValueError(f"a Unity Catalog model name has three parts, catalog.schema.model, got {value!r}")
    for part in parts:
        if not part or len(part) > 255 or any(char == " " or ord(char) < 0x20 or ord(char) == 0x7F for char in part):
            raise ValueError(
                f"{part!r} in {value!r} is not a Unity Catalog name (1 to 255 characters, no space, '/', '.' or "
                "control characters)"
            )


def parse_test_size(value: str | float | int) -> float | int:
    """A held-out count ("1000") or a ratio ("0.1"); 0 turns evaluation off."""
    number = float(value)
    if number < 0:
        raise ValueError(f"must not be negative, got {value}")
    if 0 < number < 1:
        return number
    if number != int(number):
        raise ValueError(f"must be a whole count or a ratio below 1, got {value}")
    return int(number)


def parse_module_names(value: str | Iterable[str]) -> tuple[str, ...]:
    """Comma-separated module names ("query_key_value,dense"), or a list of them, as a tuple."""
    names = value.split(",") if isinstance(value, str) else value
    return tuple(name.strip() for name in names if name.strip())


@dataclass(frozen=True)
class OptionSpec:
    """How a field appears on the command line, and what its value must be."""

    help: str = ""  # the option's --help text
    flag: str | None = None  # the option's name when it is not --field-name (Dolly's --local_rank)
    kind: str = "value"  # value: --name VALUE; switch: --name/--no-name; flag: --name alone turns it on
    click_type: Any = None  # default: from the field's type
    parse: Callable[[Any], Any] | None = None  # command-line text (or JSON value) to the field's value
    check: Callable[[Any], None] | None = None
    replayed: bool = True  # taken from a run_config.json by --config (False: about this invocation only)

    def accept(self, value: Any) -> Any:
        """``value`` parsed and checked (ValueError with the reason if it cannot be); None stays None."""
        if value is None:
            return value
        if self.parse is not None:
            value = self.parse(value)
        if self.check is not None:
            self.check(value)
        return value


def setting(default: Any = dataclasses.MISSING, *, help: str, **spec: Any) -> Any:  # noqa: A002 (click's name)
    """A settings field with its default, its help text and its command-line spec."""
    return field(default=default, metadata={"option": OptionSpec(help=help, **spec)})


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Everything that decides what a training run does (Dolly's options first, with Dolly's defaults)."""

    input_model: str = setting(DEFAULT_INPUT_MODEL, help="Input model to fine tune: a hub name or a local folder.")
    local_output_dir: str = setting(help="Write directly to this local path.")
    dbfs_output_dir: str | None = setting(None, replayed=False, help="Sync data to this path on DBFS.")
    epochs: float = setting(3, check=above_zero, help="Number of epochs to train for.")
    per_device_train_batch_size: int = setting(8, check=at_least_one, help="Batch size to use for training.")
    per_device_eval_batch_size: int = setting(8, check=at_least_one, help="Batch size to use for evaluation.")
    test_size: float | int = setting(
        1000,
        click_type=click.STRING,
        parse=parse_test_size,
        help="Records held out for evaluation: a count, or a ratio below 1.",
    )
    warmup_steps: int | None = setting(None, help="Number of steps to warm up to learning rate.")
    logging_steps: int = setting(10, check=at_least_one, help="How often to log.")
    eval_steps: int = setting(50, check=at_least_one, help="How often to run evaluation on test records.")
    save_steps: int = setting(400, check=at_least_one, help="How often to checkpoint the model.")
    save_total_limit: int = setting(10, help="Maximum number of checkpoints to keep on disk.")
    lr: float = setting(1e-5, check=above_zero, help="Learning rate to use for training.")
    seed: int = setting(DEFAULT_SEED, help="Seed to use for training.")
    deepspeed: str | None = setting(None, check=json_object_file, help="Path to deepspeed config file.")
    training_dataset: str = setting(
        DEFAULT_TRAINING_DATASET,
        help="Hub dataset name, local folder, or .jsonl/.json/.csv/.parquet file of dolly records.",
    )
    gradient_checkpointing: bool = setting(True, kind="switch", help="Use gradient checkpointing?")
    local_rank: str | int | None = setting(
        None,
        flag="--local_rank",
        click_type=click.STRING,
        replayed=False,
        help="Provided by deepspeed to identify which instance this process is when performing multi-GPU training.",
    )
    bf16: bool | None = setting(
        None,
        help="Whether to use bf16 (preferred on A100's); default: bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU.",
    )
    # ---- beyond Dolly ----
    gradient_accumulation_steps: int = setting(1, check=at_least_one, help="Micro-batches per optimizer step.")
    max_length: int | None = setting(None, help="Longest record in tokens; default: the model's own, else 1024.")
    max_steps: int = setting(-1, help="Stop after this many optimizer steps (overrides --epochs).")
    packing: bool | None = setting(
        None,
        kind="switch",
        help="Pack records into rows without padding. Default: where the model supports it and passes the packing "
        "self-check (else length-grouped padded batches); --packing insists (refuses otherwise); --no-packing pads.",
    )
    balance_ranks: bool = setting(
        True,
        kind="switch",
        help="Split each optimizer step's records over the ranks and accumulation steps so that each gets about the "
        "same number of tokens (the same records per step and the same update, less waiting for the slowest rank).",
    )
    resume: bool = setting(False, kind="switch", replayed=False, help="Continue from the latest complete checkpoint.")
    overwrite_output_dir: bool = setting(
        False, kind="flag", replayed=False, help="Start again in a non-empty output dir."
    )
    trust_remote_code: bool = setting(False, kind="flag", help="Run code shipped with the model repo.")
    lora_r: int = setting(0, help="LoRA rank; 0 (the default) fine-tunes every weight.")
    lora_alpha: int = setting(32, help="LoRA scaling numerator (alpha / r).")
    lora_dropout: float = setting(0.0, help="Dropout on the LoRA path (costs activation memory).")
    lora_target_modules: tuple[str, ...] = setting(
        (),
        click_type=click.STRING,
        parse=parse_module_names,
        help="Comma-separated module names; default: per architecture.",
    )
    load_in_4bit: bool = setting(False, kind="flag", help="QLoRA: load the frozen base in 4-bit NF4.")
    load_in_8bit: bool = setting(False, kind="flag", help="QLoRA: load the frozen base in 8-bit.")
    merge_lora: bool = setting(True, kind="switch", help="Save a merged model (default) or the adapter only.")
    mlflow: bool = setting(
        True,
        kind="switch",
        help="Log the run to MLflow from rank 0 (where MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME say).",
    )
    mlflow_log_checkpoints: bool = setting(
        False,
        kind="switch",
        help="Also log the kept checkpoints to the MLflow run (under checkpoints/, never in the model): for 12B models "
        "hundreds of GB each.",
    )
    tensorboard: bool = setting(True, kind="switch", help="Write TensorBoard logs to OUTPUT/runs (rank 0).")
    columns: str | None = setting(
        None,
        parse=normalize_columns,
        help="Your data's columns for the dolly fields: instruction=question,context=passage,response=answer (fields not "
        "named keep dolly's names), or alpaca (instruction, input, output); default: dolly's own.",
    )
    register_model: str | None = setting(
        None,
        check=registry_model_name,
        help="Also register the logged model (the chat model a serving endpoint takes) as a new version of this "
        "registered model: NAME in a workspace or local registry, catalog.schema.model in Unity Catalog (Databricks' "
        "default registry).",
    )
    eval_answers: int = setting(
        4,
        check=not_negative,
        help="Held-out instructions answered greedily at each evaluation: their stop rate is logged as eval_stop_rate, "
        "the answers go to MLflow and TensorBoard; 0 turns this off.",
    )
    eval_answer_tokens: int = setting(64, check=at_least_one, help="Longest sample answer, in new tokens.")
    stop_grace_period: float = setting(
        90.0,
        check=above_zero,
        help="Seconds a stop (SIGTERM, SIGINT) may take to finish the step and write its checkpoint before the run "
        "ends at once; 90 fits inside a 2-minute spot-reclaim notice.",
    )
    disk_check: bool = setting(
        True,
        kind="switch",
        help="Before loading the model, refuse a run whose checkpoints and finished model cannot fit in the output's "
        "free space.",
    )

    dataset_cache_dir: str | None = setting(
        None,
        help="Folder of prepared (tokenized) datasets, reused by every run on the same data and settings; default: "
        "prepared_data beside the output folder. Every rank must see it (shared storage for many nodes).",
    )
    dataset_num_proc: int | None = setting(
        None,
        check=at_least_one,
        help="Processes that tokenize the data; default: the cores available, one per 5,000 records, at most 16.",
    )
    allow_changed_data: bool = setting(
        False,
        kind="flag",
        replayed=False,
        help="Let --resume continue on data that differs from the data the checkpoint was trained on.",
    )
    collective_timeout: float | None = setting(
        None,
        check=above_zero,
        help="Longest a rank waits at a collective (a checkpoint's save, where the main process writes the gathered "
        "16-bit model), in seconds; default: from the model's size at a slow storage rate, at least 30 minutes.",
    )
    source_digest: str | None = setting(
        None,
        replayed=False,
        help="The training data's digest, computed where the data was prepared (the notebook sets it): the ranks "
        "find the prepared data by it without reading the source again.",
    )
    launch_id: str | None = setting(
        None,
        replayed=False,
        help="The launch this run belongs to (the notebook sets it): a stop file naming it stops the run, one naming "
        "another launch is removed at start.",
    )
    count_host_waits: bool = setting(
        False,
        kind="flag",
        replayed=False,
        help="Diagnostics on a GPU: count the times the host waits for the device in each optimizer step "
        "(torch.cuda.set_sync_debug_mode) and write them, with where they happen, to OUTPUT/host_waits.json.",
    )
    wait_timeout: float = setting(
        4 * 3600.0,
        check=above_zero,
        help="Longest a rank waits for the main process to prepare the data or a checkpoint, in seconds (a wait "
        "also ends when the main process stops answering).",
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            try:
                object.__setattr__(self, item.name, option_spec(item).accept(getattr(self, item.name)))
            except ValueError as err:
                raise SettingsError(f"{item.name} ({option_name(item)}): {err}") from None
        self._check_combination()

    def _check_combination(self) -> None:
        quantized = self.load_in_4bit or self.load_in_8bit
        if quantized and self.lora_r <= 0:
            raise SettingsError("--load-in-4bit/--load-in-8bit train LoRA adapters on a frozen base: give --lora-r > 0")
        if quantized and self.deepspeed:
            raise SettingsError(
                "ZeRO-3 cannot partition bitsandbytes weights: run QLoRA without --deepspeed "
                "(the DeepSpeed launcher still starts one data-parallel rank per GPU)"
            )
        if self.load_in_4bit and self.load_in_8bit:
            raise SettingsError("choose one of --load-in-4bit and --load-in-8bit")

    def overrides(self) -> dict[str, Any]:
        """The settings whose values differ from their defaults: what a command line must say to make these settings
        (``command_line(settings.overrides())`` parses back to ``settings``)."""
        return {
            item.name: getattr(self, item.name) for item in fields(self) if getattr(self, item.name) != item.default
        }

    def to_json_dict(self) -> dict[str, Any]:
        """Every setting, as JSON values (tuples as lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()
        }


# ---- reading the dataclass ----


def option_spec(item: dataclasses.Field) -> OptionSpec:
    return item.metadata["option"]


def option_name(item: dataclasses.Field) -> str:
    return option_spec(item).flag or "--" + item.name.replace("_", "-")


def setting_fields() -> tuple[dataclasses.Field, ...]:
    return fields(TrainSettings)


def replayed_names() -> set[str]:
    """The settings a run's record replays (not the per-invocation ones: resume, output copy, rank)."""
    return {item.name for item in setting_fields() if option_spec(item).replayed}


def default_of(item: dataclasses.Field) -> Any:
    """A field's default (``dataclasses.MISSING`` for a required one)."""
    return item.default


def _plain_type(item: dataclasses.Field) -> Any:
    """The field's type without ``None``: ``int | None`` -> int."""
    hint = typing.get_type_hints(TrainSettings)[item.name]
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    return hint


def _click_type(item: dataclasses.Field) -> Any:
    spec = option_spec(item)
    if spec.click_type is not None:
        return spec.click_type
    known = {str: click.STRING, int: click.INT, float: click.FLOAT, bool: click.BOOL}
    plain = _plain_type(item)
    if plain not in known:
        raise TypeError(f"setting {item.name}: give OptionSpec.click_type for {plain}")
    return known[plain]


def _callback(item: dataclasses.Field) -> Callable[[click.Context, click.Parameter, Any], Any]:
    spec = option_spec(item)

    def checked(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return spec.accept(value)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None

    return checked


def click_options(command: Callable) -> Callable:
    """Decorate a click command with one option per setting.

    Value options have no click default: a value not given on the command line comes from the dataclass (or from
    ``--config``), so the default lives in one place. ``--help`` shows it.
    """
    for item in reversed(setting_fields()):
        spec = option_spec(item)
        name = option_name(item)
        default = default_of(item)
        help_text = spec.help
        if spec.kind == "switch":
            decls = [f"{name}/--no-{name.removeprefix('--')}"]
            extra: dict[str, Any] = {"default": default, "show_default": True}
        elif spec.kind == "flag":
            decls = [name]
            extra = {"is_flag": True, "default": default}
        else:
            decls = [name]
            if default not in (None, dataclasses.MISSING, ()):
                help_text += f"  [default: {default}]"
            extra = {"type": _click_type(item), "default": None, "callback": _callback(item)}
        command = click.option(*decls, item.name, help=help_text, **extra)(command)
    return command


def given_settings(ctx: click.Context) -> dict[str, Any]:
    """The settings given on the command line (not the ones left at their defaults)."""
    return {
        item.name: ctx.params[item.name]
        for item in setting_fields()
        if ctx.get_parameter_source(item.name) not in (ParameterSource.DEFAULT, None)
    }


def command_line(overrides: dict[str, Any]) -> list[str]:
    """The trainer's flags that set ``overrides``: the inverse of the CLI (parsing them gives ``overrides`` back).

    A ``None`` or a switched-off flag that is also the default needs no flag and gets none.
    """
    by_name = {item.name: item for item in setting_fields()}
    unknown = sorted(set(overrides) - set(by_name))
    if unknown:
        raise SettingsError(f"unknown settings {unknown}; the settings are {sorted(by_name)}")
    args: list[str] = []
    for name, item in by_name.items():
        if name not in overrides:
            continue
        value, spec, option = overrides[name], option_spec(item), option_name(item)
        if value in (None, False) and value is default_of(item) and spec.kind != "switch":
            continue
        if spec.kind == "switch" and value is None:  # a switch left to its default needs no flag
            continue
        if spec.kind == "switch":
            args.append(option if value else f"--no-{option.removeprefix('--')}")
        elif spec.kind == "flag":
            if not value:
                raise SettingsError(f"{option} can only be switched on")
            args.append(option)
        elif value is None:
            raise SettingsError(f"{option} cannot be set back to None on the command line")
        elif isinstance(value, bool):
            args += [option, str(value).lower()]
        elif isinstance(value, (tuple, list)):
            args += [option, ",".join(value)]
        else:
            args += [option, str(value)]
    return args
