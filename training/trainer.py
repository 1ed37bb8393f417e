"""Fine-tune a causal LM on dolly-format records: ``python -m training.trainer`` or
``deepspeed --num_gpus N --module training.trainer``.

The public names of Dolly's ``training/trainer.py`` are kept here, so code written against Dolly keeps working.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click
from datasets import Dataset
from transformers import Trainer, TrainingArguments, set_seed

from .collators import DataCollatorForCompletionOnlyLM, DataCollatorForPackedCompletionOnlyLM
from .consts import DEFAULT_INPUT_MODEL, DEFAULT_SEED, DEFAULT_TRAINING_DATASET
from .checkpoints import CheckpointCompletion
from .data import load_training_dataset
from .deepspeed_config import deepspeed_config_for
from .distributed import accelerator_config_for, exit_after_success, is_main_process, leave_process_group
from .lora import MERGED_ADAPTER_SUBDIR, LoraSettings, apply_lora, merge_adapter
from .modeling import choose_precision, get_model_tokenizer, load_model, load_tokenizer, model_max_length
from .option_checks import check_against_data, deepspeed_config_file, positive_float
from .packing import packing_collator, restore_attention
from .preprocess import preprocess_batch, preprocess_dataset
from .quantization import quantization_config
from .run_lock import run_lock
from .saving import (
    STAGING_PREFIX,
    add_pipeline_to_config,
    copy_to_dir,
    prepare_output_dir,
    publish_dir,
    save_failed,
    write_pipeline_code,
)

__all__ = [
    "DataCollatorForCompletionOnlyLM",
    "DataCollatorForPackedCompletionOnlyLM",
    "get_model_tokenizer",
    "load_model",
    "load_tokenizer",
    "load_training_dataset",
    "preprocess_batch",
    "preprocess_dataset",
    "train",
]

logger = logging.getLogger(__name__)

STAGING_DIR_NAME = f"{STAGING_PREFIX}final"
TRAINING_LOG_NAME = "trainer_state.json"


class DollyTrainer(Trainer):
    """The Hugging Face Trainer, with a checkpoint that cannot be written reported as what it is."""

    def _save_checkpoint(self, model, trial) -> None:
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            checkpoint = f"checkpoint-{self.state.global_step}"
            raise save_failed(err, checkpoint, Path(self.args.output_dir)) from err


def parse_test_size(value: str | float | int) -> float | int:
    """A held-out count ("1000") or a ratio ("0.1"); 0 turns evaluation off."""
    number = float(value)
    if number < 0:
        raise ValueError(f"--test-size must not be negative, got {value}")
    if 0 < number < 1:
        return number
    if number != int(number):
        raise ValueError(f"--test-size must be a whole count or a ratio below 1, got {value}")
    return int(number)


def split_dataset(dataset: Dataset, test_size: float | int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``test_size`` records (a count or ratio) for evaluation."""
    if not test_size:
        return dataset, None
    if isinstance(test_size, int) and test_size >= dataset.num_rows:
        raise ValueError(f"--test-size {test_size} leaves no training records (the dataset has {dataset.num_rows})")
    split = dataset.train_test_split(test_size=test_size, seed=seed)
    logger.info("Train data size: %d, test data size: %d", split["train"].num_rows, split["test"].num_rows)
    return split["train"], split["test"]


def train(
    *,
    input_model: str = DEFAULT_INPUT_MODEL,
    local_output_dir: str,
    dbfs_output_dir: str | None = None,
    epochs: float = 3,
    per_device_train_batch_size: int = 8,
    per_device_eval_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    lr: float = 1e-5,
    seed: int = DEFAULT_SEED,
    deepspeed: str | None = None,
    gradient_checkpointing: bool = True,
    local_rank: str | int | None = None,
    bf16: bool | None = None,
    logging_steps: int = 10,
    save_steps: int = 400,
    eval_steps: int = 50,
    test_size: float | int = 1000,
    save_total_limit: int = 10,
    warmup_steps: int | None = None,
    training_dataset: str = DEFAULT_TRAINING_DATASET,
    max_length: int | None = None,
    max_steps: int = -1,
    packing: bool = True,
    resume: bool = False,
    overwrite_output_dir: bool = False,
    trust_remote_code: bool = False,
    lora_r: int = 0,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: str | tuple[str, ...] = (),
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    merge_lora: bool = True,
) -> Path:
    """Fine-tune ``input_model`` on ``training_dataset`` and save a pipeline-ready model to ``local_output_dir``.

    With ``lora_r`` > 0 only LoRA adapters (and the new tokens' rows) train; ``load_in_4bit``/``load_in_8bit`` load
    the frozen base quantized (QLoRA). ``merge_lora`` saves a plain merged model (with the adapter in ``adapter/``);
    otherwise the output holds the adapter alone. ``local_rank`` is accepted for the DeepSpeed launcher; the
    process's rank is read from its environment.
    """
    del local_rank
    if isinstance(lora_target_modules, str):
        lora_target_modules = tuple(m.strip() for m in lora_target_modules.split(",") if m.strip())
    lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules)
    quantization = quantization_config(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    if quantization is not None and not lora.enabled:
        raise ValueError("--load-in-4bit/--load-in-8bit train LoRA adapters on a frozen base: give --lora-r > 0")
    if quantization is not None and deepspeed:
        raise ValueError(
            "ZeRO-3 cannot partition bitsandbytes weights: run QLoRA without --deepspeed "
            "(the DeepSpeed launcher still starts one data-parallel rank per GPU)"
        )
    output_dir = Path(local_output_dir)
    main_process = is_main_process()
    with run_lock(output_dir, main_process):
        resume_from = prepare_output_dir(
            output_dir, resume=resume, overwrite=overwrite_output_dir, is_main_process=main_process
        )
        set_seed(seed)
        precision = choose_precision(bf16)
        logger.info("Training in %s", precision)

        # TrainingArguments come first so that, under ZeRO-3, the model is loaded straight into partitions.
        training_args = TrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=per_device_train_batch_size,
            per_device_eval_batch_size=per_device_eval_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            fp16=precision == "fp16",
            bf16=precision == "bf16",
            learning_rate=lr,
            num_train_epochs=epochs,
            max_steps=max_steps,
            deepspeed=deepspeed_config_for(deepspeed, lora=lora.enabled),
            accelerator_config=accelerator_config_for(deepspeed),
            activation_checkpointing=gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
            logging_strategy="steps",
            logging_steps=logging_steps,
            eval_strategy="steps" if test_size else "no",
            eval_steps=eval_steps,
            save_strategy="steps",
            save_steps=save_steps,
            save_total_limit=None,  # rotation counts complete checkpoints only: see CheckpointCompletion
            load_best_model_at_end=False,
            report_to=["tensorboard"],
            remove_unused_columns=False,
            prediction_loss_only=True,
            warmup_steps=warmup_steps or 0,
            seed=seed,
        )
        load_kwargs = {}
        if quantization is not None:
            load_kwargs = {"quantization_config": quantization, "device_map": {"": training_args.device}}
        model, tokenizer = get_model_tokenizer(
            input_model, gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code, **load_kwargs
        )
        if lora.enabled:
            model = apply_lora(model, tokenizer, lora, quantized=quantization is not None)
        max_length = max_length or model_max_length(model)
        dataset = preprocess_dataset(tokenizer=tokenizer, max_length=max_length, seed=seed, training_dataset=training_dataset)
        train_dataset, eval_dataset = split_dataset(dataset, test_size, seed)

        data_collator = packing_collator(model, tokenizer) if packing else None
        if data_collator is None:
            if packing:
                logger.warning("This model cannot train on packed rows; grouping records of similar length instead")
                training_args.train_sampling_strategy = "group_by_length"
            data_collator = DataCollatorForCompletionOnlyLM(tokenizer=tokenizer, pad_to_multiple_of=8)
        logger.info("Batching with %s", type(data_collator).__name__)

        trainer = DollyTrainer(
            model=model,
            processing_class=tokenizer,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            callbacks=[CheckpointCompletion(save_total_limit)],
        )
        logger.info("Training")
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        restore_attention(model)

        try:
            save_trained_model(trainer, tokenizer, output_dir, merge_lora=merge_lora, trust_remote_code=trust_remote_code)
        except Exception as err:
            raise save_failed(err, "the finished model", output_dir) from err
        if dbfs_output_dir and trainer.is_world_process_zero():
            copy_to_dir(output_dir, dbfs_output_dir)
        trainer.accelerator.wait_for_everyone()  # no rank leaves while rank 0 is still writing
        trainer.accelerator.free_memory()  # releases the DeepSpeed engine: its hooks, buffers and optimizer
    logger.info("Done.")
    return output_dir


def save_trained_model(
    trainer: Trainer, tokenizer, output_dir: Path, *, merge_lora: bool = True, trust_remote_code: bool = False
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
    publish_dir(staging, output_dir)


@click.command()
@click.option("--input-model", type=str, default=DEFAULT_INPUT_MODEL, help="Input model to fine tune")
@click.option("--local-output-dir", type=str, required=True, help="Write directly to this local path")
@click.option("--dbfs-output-dir", type=str, help="Sync data to this path on DBFS")
@click.option("--epochs", type=float, default=3, callback=positive_float, help="Number of epochs to train for.")
@click.option("--per-device-train-batch-size", type=click.IntRange(min=1), default=8, help="Batch size to use for training.")
@click.option("--per-device-eval-batch-size", type=click.IntRange(min=1), default=8, help="Batch size to use for evaluation.")
@click.option("--gradient-accumulation-steps", type=click.IntRange(min=1), default=1, help="Micro-batches per optimizer step.")
@click.option(
    "--test-size", type=str, default="1000", help="Records held out for evaluation: a count, or a ratio below 1."
)
@click.option("--warmup-steps", type=int, default=None, help="Number of steps to warm up to learning rate")
@click.option("--logging-steps", type=click.IntRange(min=1), default=10, help="How often to log")
@click.option("--eval-steps", type=click.IntRange(min=1), default=50, help="How often to run evaluation on test records")
@click.option("--save-steps", type=click.IntRange(min=1), default=400, help="How often to checkpoint the model")
@click.option("--save-total-limit", type=int, default=10, help="Maximum number of checkpoints to keep on disk")
@click.option("--lr", type=float, default=1e-5, callback=positive_float, help="Learning rate to use for training.")
@click.option("--seed", type=int, default=DEFAULT_SEED, help="Seed to use for training.")
@click.option("--deepspeed", type=str, default=None, callback=deepspeed_config_file, help="Path to deepspeed config file.")
@click.option(
    "--training-dataset",
    type=str,
    default=DEFAULT_TRAINING_DATASET,
    help="Hub dataset name, local folder, or .jsonl/.json/.parquet file of dolly records.",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    is_flag=True,
    default=True,
    help="Use gradient checkpointing?",
)
@click.option(
    "--local_rank",
    type=str,
    default=None,
    help="Provided by deepspeed to identify which instance this process is when performing multi-GPU training.",
)
@click.option("--bf16", type=bool, default=None, help="Whether to use bf16 (preferred on A100's); default: detect.")
@click.option("--max-length", type=int, default=None, help="Longest record in tokens; default: the model's own.")
@click.option("--max-steps", type=int, default=-1, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option(
    "--packing/--no-packing",
    default=True,
    help="Pack records into rows without padding (falls back to length-grouped batches where unsupported).",
)
@click.option("--resume/--no-resume", default=False, help="Continue from the latest complete checkpoint.")
@click.option("--overwrite-output-dir", is_flag=True, default=False, help="Start again in a non-empty output dir.")
@click.option("--trust-remote-code", is_flag=True, default=False, help="Run code shipped with the model repo.")
@click.option("--lora-r", type=int, default=0, help="LoRA rank; 0 (the default) fine-tunes every weight.")
@click.option("--lora-alpha", type=int, default=32, help="LoRA scaling numerator (alpha / r).")
@click.option("--lora-dropout", type=float, default=0.0, help="Dropout on the LoRA path (costs activation memory).")
@click.option(
    "--lora-target-modules", type=str, default="", help="Comma-separated module names; default: per architecture."
)
@click.option("--load-in-4bit", is_flag=True, default=False, help="QLoRA: load the frozen base in 4-bit NF4.")
@click.option("--load-in-8bit", is_flag=True, default=False, help="QLoRA: load the frozen base in 8-bit.")
@click.option("--merge-lora/--no-merge-lora", default=True, help="Save a merged model (default) or the adapter only.")
def main(**kwargs) -> None:
    """Fine-tune a causal LM on dolly-format instruction records."""
    try:
        kwargs["test_size"] = parse_test_size(kwargs["test_size"])
    except ValueError as err:
        raise click.BadParameter(str(err).removeprefix("--test-size "), param_hint="'--test-size'") from None
    check_against_data(kwargs)  # before any model is loaded or process group started
    try:
        train(**kwargs)
    finally:
        distributed = leave_process_group()
    if distributed:
        exit_after_success()


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO)
    try:
        main()
    except Exception:
        logger.exception("main failed")
        raise
