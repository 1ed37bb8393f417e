"""The first step of a run: everything the training needs, loaded and checked, and what the run record says of it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments, set_seed

from ..data import load_training_dataset
from ..preprocess import preprocess_dataset
from ..settings import TrainSettings
from .distributed import forget_shared_memory_segment
from .dolly_trainer import training_arguments
from .elastic import ResumePoint
from .lora import LoraSettings, apply_lora
from .modeling import choose_precision, get_model_tokenizer, model_max_length, training_attention
from .packing import unwrap
from .quantization import keep_4bit_weights_trainable, quantization_config
from .run_record import RunRecord

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


def split_dataset(dataset: Dataset, test_size: float | int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``test_size`` records (a count or ratio) for evaluation."""
    if not test_size:
        return dataset, None
    if isinstance(test_size, int) and test_size >= dataset.num_rows:
        raise ValueError(f"--test-size {test_size} leaves no training records (the dataset has {dataset.num_rows})")
    split = dataset.train_test_split(test_size=test_size, seed=seed)
    logger.info("Train data size: %d, test data size: %d", split["train"].num_rows, split["test"].num_rows)
    return split["train"], split["test"]


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
    """Seed, choose the precision, build the training arguments, load the model and tokenizer, read, tokenize and
    split the data."""
    set_seed(settings.seed)
    precision = choose_precision(settings.bf16)
    logger.info("Training in %s", precision)
    # First: under ZeRO-3 the model loads straight into partitions.
    args = training_arguments(settings, precision, load_universal=bool(resume and resume.universal))
    forget_shared_memory_segment()  # the process group has started: see training/rank/distributed.py
    model, tokenizer = load_for_training(settings, precision, args.device)
    max_length = settings.max_length or model_max_length(model)
    records = load_training_dataset(settings.training_dataset, settings.columns)
    dataset = preprocess_dataset(
        tokenizer=tokenizer, max_length=max_length, seed=settings.seed, training_dataset=records
    )
    train_dataset, eval_dataset = split_dataset(dataset, settings.test_size, settings.seed)
    data_facts = {
        "training_dataset": settings.training_dataset,
        "records": records.num_rows,
        "within_max_length": dataset.num_rows,
        "train_records": train_dataset.num_rows,
        "eval_records": eval_dataset.num_rows if eval_dataset is not None else 0,
    }
    return PreparedRun(
        settings=settings,
        args=args,
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        resume=resume,
        precision=precision,
        max_length=max_length,
        model_facts=model_facts(model, settings.input_model),
        data_facts=data_facts,
    )
