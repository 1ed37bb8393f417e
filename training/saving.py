"""Where training writes: guarding the output folder, finding checkpoints, and saving a pipeline-ready model."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.dynamic_module_utils import custom_object_save

from .consts import END_KEY
from .instruct_pipeline import InstructionTextGenerationPipeline, get_special_token_id, has_dolly_special_tokens

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# The Trainer writes this last into a checkpoint, so a checkpoint without it was interrupted while saving.
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"
PIPELINE_TASK = "text-generation"


class OutputExistsError(FileExistsError):
    """The output folder already holds work that a new run would overwrite."""


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (interrupted ones are skipped with a warning)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if not match or not child.is_dir():
            continue
        if not (child / CHECKPOINT_COMPLETE_MARKER).exists():
            logger.warning("Ignoring incomplete checkpoint %s (interrupted while saving)", child)
            continue
        found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def prepare_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path | None:
    """Check that a run may write to ``output_dir``; return the checkpoint to resume from, if any.

    A non-empty folder is never silently overwritten: pass ``resume`` to continue from its latest complete
    checkpoint, or ``overwrite`` to start again in it.
    """
    folder = Path(output_dir)
    existing = [p for p in folder.iterdir()] if folder.is_dir() else []
    if resume:
        checkpoints = list_checkpoints(folder)
        if checkpoints:
            logger.info("Resuming from %s", checkpoints[-1])
            return checkpoints[-1]
        logger.info("No complete checkpoint in %s; starting from the beginning", folder)
        return None
    if existing and not overwrite:
        raise OutputExistsError(
            f"output directory {folder} is not empty; pass --resume to continue from its latest checkpoint "
            "or --overwrite-output-dir to start again"
        )
    return None


def add_pipeline_to_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Point the config at our pipeline, and make plain ``generate`` stop at ``### End`` too."""
    module = InstructionTextGenerationPipeline.__module__.rsplit(".", 1)[-1]
    model.config.custom_pipelines = {
        PIPELINE_TASK: {"impl": f"{module}.{InstructionTextGenerationPipeline.__name__}", "pt": ["AutoModelForCausalLM"]}
    }
    model.config.use_cache = True
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if has_dolly_special_tokens(tokenizer):
        stop_ids.insert(0, get_special_token_id(tokenizer, END_KEY))
    generation_config = model.generation_config or GenerationConfig()
    generation_config.eos_token_id = stop_ids
    generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config


def write_pipeline_code(output_dir: str | os.PathLike) -> None:
    """Copy the pipeline module (and the modules it imports) next to a saved model."""
    custom_object_save(InstructionTextGenerationPipeline, output_dir)


def publish_dir(staging_dir: Path, output_dir: Path) -> None:
    """Move every entry of a finished ``staging_dir`` into ``output_dir``, each by an atomic rename."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for entry in staging_dir.iterdir():
        target = output_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging_dir.rmdir()


def copy_to_dir(source_dir: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy a finished output (for example to DBFS), leaving out the checkpoints."""
    logger.info("Copying %s to %s", source_dir, destination)
    shutil.copytree(
        source_dir, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint-*", ".staging-*")
    )
