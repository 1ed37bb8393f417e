"""The third step of a run: the finished model, staged and moved into the output folder, then copied and tracked."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import Trainer

from ..saved_model.model_card import CARD_NAME, LOSS_PLOT_NAME, write_model_card
from .distributed import is_main_process
from .handoff import on_main_process
from .lora import MERGED_ADAPTER_SUBDIR, merge_adapter
from .run_record import RUN_CONFIG_NAME, RunRecorder
from .saving import (
    STAGING_PREFIX,
    add_pipeline_to_config,
    copy_to_dir,
    publish_dir,
    save_failed,
    save_tokenizer,
    stopping_generation_config,
    write_pipeline_code,
)
from .tracking import log_checkpoints, log_run_files, note_logged_model

if TYPE_CHECKING:
    from .prepare import PreparedRun

logger = logging.getLogger(__name__)

STAGING_DIR_NAME = f"{STAGING_PREFIX}final"
TRAINING_LOG_NAME = "trainer_state.json"


def save_trained_model(
    trainer: Trainer,
    tokenizer,
    output_dir: Path,
    *,
    merge_lora: bool = True,
    trust_remote_code: bool = False,
    recorder: RunRecorder | None = None,
) -> None:
    """Save model, tokenizer, generation config and pipeline code: staged first, then moved into place (collective:
    every rank saves its part of the weights; the main process writes the rest).

    A LoRA run saves its adapter; merged (the default), the output is a plain model with the adapter in ``adapter/``.
    """
    staging = save_weights(trainer, tokenizer, output_dir)
    if is_main_process():
        finish_saving(
            trainer,
            tokenizer,
            output_dir,
            staging,
            merge_lora=merge_lora,
            trust_remote_code=trust_remote_code,
            recorder=recorder,
        )


def save_weights(trainer: Trainer, tokenizer, output_dir: Path) -> Path:
    """The trained weights saved into the staging folder (collective under ZeRO-3: every rank takes part)."""
    staging = output_dir / STAGING_DIR_NAME
    is_lora = hasattr(trainer.model, "peft_config")
    if not is_lora:
        add_pipeline_to_config(trainer.model, tokenizer)
    logger.info("Saving %s to %s", "adapter" if is_lora else "model", output_dir)
    trainer.save_model(output_dir=str(staging))
    return staging


def finish_saving(
    trainer: Trainer,
    tokenizer,
    output_dir: Path,
    staging: Path,
    *,
    merge_lora: bool = True,
    trust_remote_code: bool = False,
    recorder: RunRecorder | None = None,
) -> None:
    """The main process's part of saving: tokenizer, LoRA merge, pipeline code, loss history, record and card, then
    the staged folder moved into place."""
    is_lora = hasattr(trainer.model, "peft_config")
    save_tokenizer(tokenizer, staging)
    if is_lora and merge_lora:
        merged_staging = output_dir / f"{STAGING_DIR_NAME}-merged"
        merged = merge_adapter(staging, tokenizer, trust_remote_code=trust_remote_code)
        add_pipeline_to_config(merged, tokenizer)
        merged.save_pretrained(merged_staging)
        save_tokenizer(tokenizer, merged_staging)
        write_pipeline_code(merged_staging)
        os.replace(staging, merged_staging / MERGED_ADAPTER_SUBDIR)
        staging = merged_staging
    elif not is_lora:
        write_pipeline_code(staging)
    else:  # an adapter alone: its generation config stops at ### End too (servers read it beside the adapter)
        stopping_generation_config(tokenizer, copy.deepcopy(trainer.model.generation_config)).save_pretrained(staging)
    trainer.state.save_to_json(str(staging / TRAINING_LOG_NAME))  # the loss history, next to the model
    if recorder is not None:
        recorder.write(staging)
    write_model_card(staging, published_as=output_dir)
    publish_dir(staging, output_dir)


def publish(trainer: Trainer, prepared: PreparedRun, recorder: RunRecorder, tracking: Any) -> None:
    """Save the finished model's weights (all ranks), then, on the main process alone, the rest of it, its MLflow
    model and its copy, while the other ranks wait through the bounded hand-off (a heartbeat, ``--wait-timeout``):
    not a collective, whose timeout would end a publish longer than it (merging a 12b model, uploading it)."""
    settings = prepared.settings
    output_dir = Path(settings.local_output_dir)
    try:
        staging = save_weights(trainer, prepared.tokenizer, output_dir)
    except Exception as err:
        raise save_failed(err, "the finished model", output_dir) from err

    def publish_here() -> None:
        try:
            finish_saving(
                trainer,
                prepared.tokenizer,
                output_dir,
                staging,
                merge_lora=settings.merge_lora,
                trust_remote_code=settings.trust_remote_code,
                recorder=recorder,
            )
        except Exception as err:
            raise save_failed(err, "the finished model", output_dir) from err
        if tracking is not None:
            from ..saved_model.mlflow_model import log_pipeline_model

            logged = log_pipeline_model(output_dir, registered_model_name=settings.register_model)  # its files only
            note_logged_model(tracking, output_dir, logged, settings.register_model)  # the card names them
            log_run_files(tracking, output_dir, [RUN_CONFIG_NAME, CARD_NAME, LOSS_PLOT_NAME])
            if settings.mlflow_log_checkpoints:
                log_checkpoints(tracking, output_dir)
        if settings.dbfs_output_dir:  # last: the copy's card names the MLflow model
            copy_to_dir(output_dir, settings.dbfs_output_dir)

    on_main_process(
        "publish",
        publish_here,
        timeout_s=settings.wait_timeout,
        what="publish the finished model (its files, MLflow model and copy)",
    )
    trainer.accelerator.free_memory()  # releases the DeepSpeed engine: its hooks, buffers and optimizer
