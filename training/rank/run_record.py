"""``run_config.json``: what a run was, written beside its model and into every checkpoint, and replayable.

The record holds the settings as given (every option), what they resolved to (precision, max length, world size,
the DeepSpeed config as the engine used it), the model and the data (file and record counts), the command line
and the library versions. ``python -m training.trainer --config OUT/run_config.json --local-output-dir NEW`` runs
the same training again; options given on that command line win over the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..folder_commit import write_atomically
from ..settings import SettingsError, TrainSettings, replayed_names, setting_fields
from .distributed import is_main_process

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
RECORD_FORMAT = 1
LIBRARIES = ("torch", "transformers", "deepspeed", "accelerate", "datasets", "peft", "bitsandbytes", "tokenizers")


def library_versions() -> dict[str, str]:
    """Python's and the training libraries' versions (libraries that are not installed are left out)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """The record of one run. Each section is a value made where it is known (the model and data sections by the
    prepare step, the engine's by the Trainer's start) and put in whole: nothing edits a section afterwards."""

    settings: TrainSettings
    resolved: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    command: list[str] = dataclasses.field(default_factory=lambda: list(sys.argv))
    started: str = dataclasses.field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    versions: dict[str, str] = dataclasses.field(default_factory=library_versions)

    def with_resolved(self, **values: Any) -> RunRecord:
        """The same record with more resolved values (a new record: this one is unchanged)."""
        return dataclasses.replace(self, resolved={**self.resolved, **values})

    def to_json(self) -> str:
        record = {
            "format": RECORD_FORMAT,
            "settings": self.settings.to_json_dict(),
            "resolved": self.resolved,
            "model": self.model,
            "data": self.data,
            "command": self.command,
            "started": self.started,
            "versions": self.versions,
        }
        return json.dumps(record, indent=2, default=str) + "\n"

    def write(self, folder: str | Path) -> Path:
        """Write ``run_config.json`` into ``folder`` atomically."""
        path = Path(folder) / RUN_CONFIG_NAME
        write_atomically(path, self.to_json())
        return path


def engine_facts(args: TrainingArguments) -> dict[str, Any]:
    """What the Trainer's engine resolved: the world size, and the DeepSpeed config with its "auto" values filled."""
    facts: dict[str, Any] = {"world_size": args.world_size}
    deepspeed_config = getattr(args, "hf_deepspeed_config", None)
    if deepspeed_config is not None:
        facts["deepspeed_config"] = deepspeed_config.config
    return facts


class RunRecorder(TrainerCallback):
    """Keeps a run's record: completes it with the engine's facts when training begins and writes it into the output
    folder (main process); :meth:`write` puts it into a checkpoint or the finished model."""

    def __init__(self, record: RunRecord):
        self.record = record

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.record = self.record.with_resolved(**engine_facts(args))
        if is_main_process():
            self.record.write(args.output_dir)

    def write(self, folder: str | Path) -> Path:
        return self.record.write(folder)


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The settings a ``run_config.json`` replays (not the per-invocation ones: resume, output copies, rank).

    Errors name the file and the offending key.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SettingsError(f"{path}: not a valid run_config.json ({err})") from None
    settings = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path}: no 'settings' object (is this a run_config.json?)")
    if record.get("format") != RECORD_FORMAT:
        raise SettingsError(f"{path}: record format {record.get('format')!r}, this version reads {RECORD_FORMAT}")
    replayed = replayed_names()
    known = {item.name for item in setting_fields()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SettingsError(f"{path}: unknown settings {unknown} in 'settings'")
    return {name: value for name, value in settings.items() if name in replayed}
