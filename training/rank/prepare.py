"""The first step of a run: everything the training needs, loaded and checked, and what the run record says of it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments, set_seed

from ..prepared_data import split_held_out
from ..settings import TrainSettings
from .deepspeed_config import deepspeed_config_for
from .disk_check import check_disk_for, collective_timeout_s
from .distributed import accelerator_config_for, forget_shared_memory_segment, world_size
from .elastic import ResumePoint, make_loadable
from .lora import LoraSettings, apply_lora
from .modeling import choose_precision, get_model_tokenizer, training_attention
from .packing import unwrap
from .quantization import keep_4bit_weights_trainable, quantization_config
from .run_record import RunRecord
from .training_data import run_data

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRun:
    """A run ready to train: its arguments, model, tokenizer and data, and the record's model and data sections."""

    settings: TrainSettings
    args: TrainingArguments
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train_dataset: Dataset
    eval_dataset: Dataset | None
    resume: ResumePoint | None
    precision: str
    max_length: int
    model_facts: dict[str, Any]
    data_facts: dict[str, Any]

    def record(self, **resolved: Any) -> RunRecord:
        """The run's record, with what the settings resolved to (and ``resolved`` besides)."""
        return RunRecord(
            self.settings,
            resolved={
                "precision": self.precision,
                "max_length": self.max_length,
                "resumed_from": str(self.resume.checkpoint) if self.resume else None,
                **resolved,
            },
            model=self.model_facts,
            data=self.data_facts,
        )


def training_arguments(settings: TrainSettings, precision: str, *, load_universal: bool = False) -> TrainingArguments:
    """The Hugging Face ``TrainingArguments`` for a run's settings, in the precision chosen for this machine.

    Built once per run, before the model is loaded (under ZeRO-3 they start the process group and the DeepSpeed
    config that loading the model straight into partitions needs), and never changed: nothing in them depends on
    the model or on the batching chosen for it. ``load_universal``: the run resumes from DeepSpeed's universal
    checkpoint (on another number of ranks, see training/rank/elastic.py).
    """
    gradient_checkpointing = settings.gradient_checkpointing
    timeout = collective_timeout_s(settings, precision, world_size())
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
        deepspeed=deepspeed_config_for(settings.deepspeed, lora=settings.lora_r > 0, load_universal=load_universal),
        accelerator_config=accelerator_config_for(settings.deepspeed, timeout_s=timeout),
        ddp_timeout=timeout,
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
        report_to=[
            name for name, wanted in (("tensorboard", settings.tensorboard), ("mlflow", settings.mlflow)) if wanted
        ]
        or "none",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        prediction_loss_only=True,
        warmup_steps=settings.warmup_steps or 0,
        seed=settings.seed,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only helps copies to a GPU
    )


def split_dataset(dataset: Dataset, test_size: float | int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``test_size`` records (a count or ratio) for evaluation, as a run does (a seeded permutation)."""
    train, test = split_held_out(dataset, test_size, seed)
    logger.info("Train data size: %d, test data size: %d", train.num_rows, test.num_rows if test is not None else 0)
    return train, test


def parameter_count(model, *, trainable_only: bool = False) -> int:
    """Parameters of a model, also when ZeRO-3 has partitioned them (each then knows its full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def model_facts(model: PreTrainedModel, input_model: str) -> dict[str, Any]:
    """The run record's model section."""
    return {
        "input_model": input_model,
        "model_type": unwrap(model).config.model_type,
        "parameters": parameter_count(model),
        "trainable_parameters": parameter_count(model, trainable_only=True),
    }


def load_for_training(
    settings: TrainSettings, precision: str, device: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (quantized, with LoRA adapters, in the attention training uses, as the settings say) and tokenizer."""
    quantization = quantization_config(load_in_8bit=settings.load_in_8bit, load_in_4bit=settings.load_in_4bit)
    load_kwargs: dict[str, Any] = {}
    if quantization is not None:
        load_kwargs = {"quantization_config": quantization, "device_map": {"": device}}
    if (attention := training_attention(precision)) is not None:
        load_kwargs["attn_implementation"] = attention
    model, tokenizer = get_model_tokenizer(
        settings.input_model,
        gradient_checkpointing=settings.gradient_checkpointing,
        trust_remote_code=settings.trust_remote_code,
        **load_kwargs,
    )
    lora = LoraSettings(
        r=settings.lora_r,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules,
    )
    if quantization is not None:
        keep_4bit_weights_trainable(model)
    if lora.enabled:
        model = apply_lora(model, tokenizer, lora, quantized=quantization is not None)
    return model, tokenizer


def prepare(settings: TrainSettings, resume: ResumePoint | None) -> PreparedRun:
    """Seed, build the training arguments, prepare and split the data (checked against a resumed checkpoint), check
    the disk, make a resumed checkpoint loadable, then load the model and tokenizer. Collective: every rank calls it."""
    set_seed(settings.seed)
    precision = choose_precision(settings.bf16)
    # First: under ZeRO-3 the model loads straight into partitions.
    args = training_arguments(settings, precision, load_universal=bool(resume and resume.universal))
    forget_shared_memory_segment()  # the process group has started: see training/rank/distributed.py
    data = run_data(settings, resume.checkpoint if resume else None)
    if settings.disk_check:
        check_disk_for(settings, resume, world_size(), train_records=data.facts["train_records"])
    if resume is not None:
        make_loadable(resume, wait_timeout=settings.wait_timeout)
    logger.info("Training in %s", precision)
    model, tokenizer = load_for_training(settings, precision, args.device)
    return PreparedRun(
        settings=settings,
        args=args,
        model=model,
        tokenizer=tokenizer,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        resume=resume,
        precision=precision,
        max_length=data.max_length,
        model_facts=model_facts(model, settings.input_model),
        data_facts=data.facts,
    )
