"""Fine-tune a causal LM on dolly-format records: ``python -m training.trainer`` or
``deepspeed --num_gpus N --module training.trainer``.

The public names of Dolly's ``training/trainer.py`` are kept here, so code written against Dolly keeps working.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import click
from datasets import Dataset
from transformers import Trainer, TrainingArguments, set_seed

from .collators import DataCollatorForCompletionOnlyLM
from .checkpoints import CheckpointCompletion
from .data import load_training_dataset
from .deepspeed_config import deepspeed_config_for
from .distributed import (
    accelerator_config_for,
    exit_after_success,
    forget_shared_memory_segment,
    is_main_process,
    leave_process_group,
)
from .lora import MERGED_ADAPTER_SUBDIR, LoraSettings, apply_lora, merge_adapter
from .modeling import (
    choose_precision,
    get_model_tokenizer,
    load_model,
    load_tokenizer,
    model_max_length,
    training_attention,
)
from .option_checks import check_against_data
from .packing import DataCollatorForPackedCompletionOnlyLM, packed_batches, unwrap
from .preprocess import preprocess_batch, preprocess_dataset
from .quantization import quantization_config
from .run_lock import run_lock
from .model_card import CARD_NAME, LOSS_PLOT_NAME, read_json, write_model_card
from .run_record import RUN_CONFIG_NAME, RecordAtTrainBegin, RunRecord, read_run_config
from .saving import (
    STAGING_PREFIX,
    add_pipeline_to_config,
    copy_to_dir,
    prepare_output_dir,
    publish_dir,
    save_failed,
    write_pipeline_code,
)
from .settings import SettingsError, TrainSettings, click_options, given_settings, parse_test_size
from .tracking import log_run_files, mlflow_run

__all__ = [
    "DataCollatorForCompletionOnlyLM",
    "DataCollatorForPackedCompletionOnlyLM",
    "get_model_tokenizer",
    "load_model",
    "load_tokenizer",
    "load_training_dataset",
    "preprocess_batch",
    "preprocess_dataset",
    "parse_test_size",
    "train",
]

logger = logging.getLogger(__name__)

STAGING_DIR_NAME = f"{STAGING_PREFIX}final"
TRAINING_LOG_NAME = "trainer_state.json"


class DollyTrainer(Trainer):
    """The Hugging Face Trainer, with a checkpoint that cannot be written reported as what it is, and the tokens per
    second since the last log in every training log (so MLflow and TensorBoard show throughput per step)."""

    _last_log: tuple[float, int] | None = None  # (time, input tokens seen) at the previous training log

    def train(self, *args, **kwargs):
        self._last_log = None
        return super().train(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.args.include_num_input_tokens_seen != "no":
            now, seen = time.time(), self.state.num_input_tokens_seen  # the clock of start_time
            since = self._last_log or (start_time or now, getattr(self, "_initial_num_input_tokens_seen", 0))
            if now > since[0]:
                logs["tokens_per_second"] = round((seen - since[1]) / (now - since[0]), 1)
            self._last_log = (now, seen)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            checkpoint = f"checkpoint-{self.state.global_step}"
            raise save_failed(err, checkpoint, Path(self.args.output_dir)) from err


def split_dataset(dataset: Dataset, test_size: float | int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``test_size`` records (a count or ratio) for evaluation."""
    if not test_size:
        return dataset, None
    if isinstance(test_size, int) and test_size >= dataset.num_rows:
        raise ValueError(f"--test-size {test_size} leaves no training records (the dataset has {dataset.num_rows})")
    split = dataset.train_test_split(test_size=test_size, seed=seed)
    logger.info("Train data size: %d, test data size: %d", split["train"].num_rows, split["test"].num_rows)
    return split["train"], split["test"]


def training_arguments(settings: TrainSettings, precision: str) -> TrainingArguments:
    """The Hugging Face ``TrainingArguments`` for a run's settings, in the precision chosen for this machine."""
    gradient_checkpointing = settings.gradient_checkpointing
    return TrainingArguments(
        output_dir=settings.local_output_dir,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        deepspeed=deepspeed_config_for(settings.deepspeed, lora=settings.lora_r > 0),
        accelerator_config=accelerator_config_for(settings.deepspeed),
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if settings.test_size else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=None,  # rotation counts complete checkpoints only: see CheckpointCompletion
        load_best_model_at_end=False,
        report_to=["tensorboard", "mlflow"] if settings.mlflow else ["tensorboard"],
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        prediction_loss_only=True,
        warmup_steps=settings.warmup_steps or 0,
        seed=settings.seed,
    )


def parameter_count(model, *, trainable_only: bool = False) -> int:
    """Parameters of a model, also when ZeRO-3 has partitioned them (each then knows its full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def train(settings: TrainSettings | None = None, **kwargs) -> Path:
    """Fine-tune a model on dolly records and save a pipeline-ready model to ``local_output_dir``.

    Takes Dolly's keywords (``train(input_model=..., local_output_dir=..., epochs=..., ...)``) and ours: each is a
    field of :class:`~training.settings.TrainSettings`, where its default and meaning are. Or pass the settings
    themselves (keywords then override them).
    """
    if settings is None:
        settings = TrainSettings(**kwargs)
    elif kwargs:
        settings = dataclasses.replace(settings, **kwargs)
    lora = LoraSettings(
        r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules,
    )
    quantization = quantization_config(load_in_8bit=settings.load_in_8bit, load_in_4bit=settings.load_in_4bit)
    output_dir = Path(settings.local_output_dir)
    main_process = is_main_process()
    record = RunRecord(settings)
    with run_lock(output_dir, main_process):
        resume_from = prepare_output_dir(
            output_dir, resume=settings.resume, overwrite=settings.overwrite_output_dir, is_main_process=main_process
        )
        set_seed(settings.seed)
        precision = choose_precision(settings.bf16)
        logger.info("Training in %s", precision)

        # TrainingArguments come first so that, under ZeRO-3, the model is loaded straight into partitions.
        training_args = training_arguments(settings, precision)
        forget_shared_memory_segment()  # the process group has started: see training/distributed.py
        load_kwargs = {}
        if quantization is not None:
            load_kwargs = {"quantization_config": quantization, "device_map": {"": training_args.device}}
        if (attention := training_attention(precision)) is not None:
            load_kwargs["attn_implementation"] = attention
        model, tokenizer = get_model_tokenizer(
            settings.input_model,
            gradient_checkpointing=settings.gradient_checkpointing,
            trust_remote_code=settings.trust_remote_code,
            **load_kwargs,
        )
        if lora.enabled:
            model = apply_lora(model, tokenizer, lora, quantized=quantization is not None)
        max_length = settings.max_length or model_max_length(model)
        records = load_training_dataset(settings.training_dataset)
        dataset = preprocess_dataset(tokenizer=tokenizer, max_length=max_length, seed=settings.seed, training_dataset=records)
        train_dataset, eval_dataset = split_dataset(dataset, settings.test_size, settings.seed)
        record.resolved.update(precision=precision, max_length=max_length, resumed_from=str(resume_from) if resume_from else None)
        record.model = {
            "input_model": settings.input_model,
            "model_type": unwrap(model).config.model_type,
            "parameters": parameter_count(model),
            "trainable_parameters": parameter_count(model, trainable_only=True),
        }
        record.data = {
            "training_dataset": settings.training_dataset,
            "records": records.num_rows,
            "within_max_length": dataset.num_rows,
            "train_records": train_dataset.num_rows,
            "eval_records": eval_dataset.num_rows if eval_dataset is not None else 0,
        }

        with mlflow_run(settings, main_process=main_process, resumed_from=earlier_mlflow_run(output_dir, settings)) as run:
            if run is not None:
                record.resolved["mlflow_run_id"] = run.info.run_id
            train_and_save(settings, record, run, model, tokenizer, training_args, train_dataset, eval_dataset, resume_from)
    logger.info("Done.")
    return output_dir


def earlier_mlflow_run(output_dir: Path, settings: TrainSettings) -> str | None:
    """The MLflow run a resumed training continues (from the run record it left), if any."""
    if not settings.resume:
        return None
    return read_json(output_dir / RUN_CONFIG_NAME).get("resolved", {}).get("mlflow_run_id")


def train_and_save(
    settings: TrainSettings,
    record: RunRecord,
    run: Any,
    model,
    tokenizer,
    training_args: TrainingArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    resume_from: Path | None,
) -> None:
    """Train, then save the finished model (all ranks), its copy and its MLflow model (rank 0)."""
    output_dir = Path(settings.local_output_dir)
    # Packed rows change the step (rows, attention, output layer): everything that differs is in training/packing.py.
    with packed_batches(model, tokenizer, packing=settings.packing) as batching:
        if batching.group_by_length:
            training_args.train_sampling_strategy = "group_by_length"
        trainer = DollyTrainer(
            model=model,
            processing_class=tokenizer,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=batching.collator,
            callbacks=[RecordAtTrainBegin(record), CheckpointCompletion(settings.save_total_limit, record.write)],
        )
        logger.info("Training")
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    try:
        save_trained_model(
            trainer, tokenizer, output_dir, merge_lora=settings.merge_lora,
            trust_remote_code=settings.trust_remote_code, record=record,
        )
    except Exception as err:
        raise save_failed(err, "the finished model", output_dir) from err
    if settings.dbfs_output_dir and trainer.is_world_process_zero():
        copy_to_dir(output_dir, settings.dbfs_output_dir)
    if run is not None:
        from .mlflow_model import log_pipeline_model

        log_run_files(run, output_dir, [RUN_CONFIG_NAME, CARD_NAME, LOSS_PLOT_NAME])
        log_pipeline_model(output_dir, registered_model_name=settings.register_model)
    trainer.accelerator.wait_for_everyone()  # no rank leaves while rank 0 is still writing
    trainer.accelerator.free_memory()  # releases the DeepSpeed engine: its hooks, buffers and optimizer


def save_trained_model(
    trainer: Trainer,
    tokenizer,
    output_dir: Path,
    *,
    merge_lora: bool = True,
    trust_remote_code: bool = False,
    record: RunRecord | None = None,
) -> None:
    """Save model, tokenizer, generation config and pipeline code: staged first, then moved into place.

    A LoRA run saves its adapter; merged (the default), the output is a plain model with the adapter in ``adapter/``.
    """
    staging = output_dir / STAGING_DIR_NAME
    is_lora = hasattr(trainer.model, "peft_config")
    if not is_lora:
        add_pipeline_to_config(trainer.model, tokenizer)
    logger.info("Saving %s to %s", "adapter" if is_lora else "model", output_dir)
    trainer.save_model(output_dir=str(staging))  # collective under ZeRO-3: every rank takes part
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(staging)
    if is_lora and merge_lora:
        merged_staging = output_dir / f"{STAGING_DIR_NAME}-merged"
        merged = merge_adapter(staging, tokenizer, trust_remote_code=trust_remote_code)
        add_pipeline_to_config(merged, tokenizer)
        merged.save_pretrained(merged_staging)
        tokenizer.save_pretrained(merged_staging)
        write_pipeline_code(merged_staging)
        os.replace(staging, merged_staging / MERGED_ADAPTER_SUBDIR)
        staging = merged_staging
    elif not is_lora:
        write_pipeline_code(staging)
    trainer.state.save_to_json(str(staging / TRAINING_LOG_NAME))  # the loss history, next to the model
    if record is not None:
        record.write(staging)
    write_model_card(staging, published_as=output_dir)
    publish_dir(staging, output_dir)


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Replay the settings of a run's run_config.json; options given here win.",
)
@click_options
@click.pass_context
def main(ctx: click.Context, config_file: str | None, **options) -> None:
    """Fine-tune a causal LM on dolly-format instruction records."""
    try:
        chosen = {**(read_run_config(config_file) if config_file else {}), **given_settings(ctx)}
        if "local_output_dir" not in chosen:
            raise click.UsageError("Missing option '--local-output-dir' (or --config with a run's run_config.json).")
        settings = TrainSettings(**chosen)
    except SettingsError as err:
        raise click.UsageError(str(err)) from None
    check_against_data(settings)  # before any model is loaded or process group started
    try:
        train(settings)
    finally:
        distributed = leave_process_group()
    if distributed:
        exit_after_success()


def run_cli(argv: list[str] | None = None) -> None:
    """The command line, with logging set up and a failure logged with its traceback on the rank that failed."""
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO)
    try:
        main(args=argv)
    except Exception:
        logger.exception("main failed")
        raise


if __name__ == "__main__":
    run_cli()
