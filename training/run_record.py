"""``run_config.json``: what a run was, written beside its model and into every checkpoint, and replayable.

The record holds the settings as given (every option), what they resolved to (precision, max length, world size,
the DeepSpeed config as the engine used it), the model and the data (file and record counts), the command line
and the library versions. ``python -m training.trainer --config OUT/run_config.json --local-output-dir NEW`` runs
the same training again; options given on that command line win over the file.
"""

from __future__ import annotations

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

from .checkpoints import write_atomically
from .settings import SettingsError, TrainSettings, replayed_names, setting_fields

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
RECORD_FORMAT = 1
LIBRARIES = ("torch", "transformers", "deepspeed", "accelerate", "datasets", "peft", "bitsandbytes", "tokenizers")


def library_versions() -> dict[str, str]:
    """Python's and the training libraries' versions (libraries that are not installed are left out)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclasses.dataclass
class RunRecord:
    """The record of one run; ``resolved``, ``model`` and ``data`` are filled in as the run learns them."""

    settings: TrainSettings
    command: list[str] = dataclasses.field(default_factory=lambda: list(sys.argv))
    started: str = dataclasses.field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    resolved: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=library_versions)

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


class RecordAtTrainBegin(TrainerCallback):
    """Completes the record once the engine is set up, and writes it into the output folder when training begins."""

    def __init__(self, record: RunRecord):
        self.record = record

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.record.resolved["world_size"] = args.world_size
        deepspeed_config = getattr(args, "hf_deepspeed_config", None)
        if deepspeed_config is not None:
            self.record.resolved["deepspeed_config"] = deepspeed_config.config  # "auto" values filled in
        if state.is_world_process_zero:
            self.record.write(args.output_dir)


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
