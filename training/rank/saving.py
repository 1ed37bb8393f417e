"""Where training writes: guarding the output folder, and publishing a pipeline-ready model into it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.dynamic_module_utils import custom_object_save

from ..folder_commit import building_folder, commit, mark_complete, sweep_abandoned_builds
from ..saved_model.chat_template import DOLLY_CHAT_TEMPLATE
from ..saved_model.instruct_pipeline import (
    InstructionTextGenerationPipeline,
    stop_token_ids,
)
from .checkpoints import list_checkpoints, remove_incomplete_checkpoints
from .run_lock import LOCK_FILE_NAME
from .stopping import STOP_FILE_NAME

logger = logging.getLogger(__name__)

PIPELINE_TASK = "text-generation"
STAGING_PREFIX = ".staging-"
# The files a loader opens first (a full model's, an adapter's): published last, so that a folder holding them holds
# the rest of the finished model too.
LOADER_ENTRY_FILES = ("config.json", "adapter_config.json")
# Entries of an output folder that are not a run's work.
NOT_WORK = {LOCK_FILE_NAME, STOP_FILE_NAME}


class OutputExistsError(FileExistsError):
    """The output folder already holds work that a new run would overwrite."""


class SaveFailedError(RuntimeError):
    """Writing a checkpoint or the finished model failed; earlier work was left as it was."""


def is_finished_output(output_dir: str | os.PathLike) -> bool:
    """Whether ``output_dir`` holds a finished (published) model or adapter."""
    return any((Path(output_dir) / name).is_file() for name in LOADER_ENTRY_FILES)


def save_failed(err: Exception, what: str, output_dir: Path) -> SaveFailedError:
    """A clear error for a failed save (disk full, folder not writable, ...), saying what was kept."""
    reason = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.strerror else str(err)
    kept = [path.name for path in list_checkpoints(output_dir)]
    finished = "The finished model already there is unchanged. " if is_finished_output(output_dir) else ""
    return SaveFailedError(
        f"could not write {what} in {output_dir}: {reason}. {finished}"
        f"Complete checkpoints kept: {', '.join(kept) or 'none'}. "
        "Free space or fix the folder's permissions, then run again with --resume."
    )


def remove_run_leftovers(folder: Path) -> None:
    """Delete what an interrupted run leaves behind: unmarked checkpoints and half-written staging folders."""
    remove_incomplete_checkpoints(folder)
    for staging in folder.glob(f"{STAGING_PREFIX}*"):
        logger.warning("Removing %s (a save that did not finish)", staging)
        shutil.rmtree(staging, ignore_errors=True)


def prepare_output_dir(
    output_dir: str | os.PathLike, *, resume: bool, overwrite: bool, is_main_process: bool = True
) -> Path | None:
    """Check that a run may write to ``output_dir``; return the checkpoint to resume from, if any.

    A non-empty folder is never silently overwritten: pass ``resume`` to continue from its newest complete
    checkpoint, or ``overwrite`` to delete what is there and start again. Only the main process changes the folder
    (it holds the run's lock); the others read it.
    """
    folder = Path(output_dir)
    existing = [p for p in folder.iterdir() if p.name not in NOT_WORK] if folder.is_dir() else []
    if resume:
        if is_main_process:
            remove_run_leftovers(folder)
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
    if existing and is_main_process:
        logger.warning("--overwrite-output-dir: deleting the contents of %s", folder)
        for entry in existing:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return None


def add_pipeline_to_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Point the config at our pipeline, and make plain ``generate`` stop at ``### End`` too."""
    module = InstructionTextGenerationPipeline.__module__.rsplit(".", 1)[-1]
    model.config.custom_pipelines = {
        PIPELINE_TASK: {
            "impl": f"{module}.{InstructionTextGenerationPipeline.__name__}",
            "pt": ["AutoModelForCausalLM"],
        }
    }
    model.config.use_cache = True
    model.generation_config = stopping_generation_config(tokenizer, model.generation_config)


def stopping_generation_config(
    tokenizer: PreTrainedTokenizerBase, base: GenerationConfig | None = None
) -> GenerationConfig:
    """``base`` (or a default one) made to stop at ``### End`` and at EOS, padding with the tokenizer's pad token:
    what a server that reads the saved ``generation_config.json`` then does too."""
    generation_config = base or GenerationConfig()
    generation_config.eos_token_id = stop_token_ids(tokenizer)  # the pipeline's own
    generation_config.pad_token_id = tokenizer.pad_token_id
    return generation_config


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Save ``tokenizer`` with Dolly's chat template (``training/saved_model/chat_template.py``): as
    ``chat_template.jinja``, where transformers reads it, and in ``tokenizer_config.json`` too, where TGI reads it."""
    tokenizer.chat_template = DOLLY_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = DOLLY_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_pipeline_code(output_dir: str | os.PathLike) -> None:
    """Copy the pipeline module (and the modules it imports) next to a saved model."""
    custom_object_save(InstructionTextGenerationPipeline, output_dir)


def publish_dir(staging_dir: Path, output_dir: Path) -> None:
    """Move every entry of a finished ``staging_dir`` into ``output_dir``, each by an atomic rename.

    A model already there first stops looking finished (its loader entry files go), and the new one's loader entry
    files come last: stopped at any point, the folder either looks finished and is, or does not look finished.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in LOADER_ENTRY_FILES:
        (output_dir / name).unlink(missing_ok=True)
    entries = sorted(staging_dir.iterdir(), key=lambda entry: entry.name in LOADER_ENTRY_FILES)
    for entry in entries:
        target = output_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging_dir.rmdir()


def copy_to_dir(source_dir: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy a finished output (to a volume, or DBFS), leaving out the checkpoints: into a building folder beside the
    destination, marked complete (every file and its size), then moved into place, an earlier copy replaced. A copy
    cut short never stands at ``destination``; on object storage, readers check the marker
    (:func:`training.folder_commit.is_complete`)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned_builds(destination.parent)
    building = building_folder(destination)
    logger.info("Copying %s to %s", source_dir, destination)
    try:
        shutil.copytree(
            source_dir,
            building,
            ignore=shutil.ignore_patterns("checkpoint-*", f"{STAGING_PREFIX}*", LOCK_FILE_NAME, STOP_FILE_NAME),
        )
        mark_complete(building, source=str(source_dir))
        commit(building, destination, replace=True)
    finally:
        shutil.rmtree(building, ignore_errors=True)
