"""Commits that hold on object storage (training/folder_commit.py): a folder is complete when its marker, written
last and naming every file with its size, says so; a rename that is a copy then a delete (as on Unity Catalog volumes
and DBFS) is never read as complete before every file has arrived; abandoned builds are swept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import training.folder_commit as folder_commit
from training.folder_commit import (
    MARKER_NAME,
    building_folder,
    commit,
    is_complete,
    mark_complete,
    sweep_abandoned_builds,
)


def build(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "shard-0.arrow").write_bytes(os.urandom(5000))
    (folder / "data" / "shard-1.arrow").write_bytes(os.urandom(3000))
    (folder / "info.json").write_text('{"records": 2}')
    mark_complete(folder, fingerprint="abc")
    return folder


class CopyThenDeleteRename:
    """A rename as FUSE over object storage does it: each file copied (the marker first: nothing orders them, and a
    big file arrives in parts), then the source deleted. ``seen`` holds what a reader made of the target after each
    write."""

    def __init__(self, reader):
        self.reader, self.seen = reader, []

    def __call__(self, source: Path, target: Path) -> Path:
        files = sorted(p for p in Path(source).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name != MARKER_NAME)  # the worst order: the marker arrives first
        for path in files:
            destination = Path(target) / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            destination.write_bytes(data[: len(data) // 2])  # the first part of the upload
            self.seen.append(self.reader(Path(target)))
            destination.write_bytes(data)
            self.seen.append(self.reader(Path(target)))
        shutil.rmtree(source)
        return Path(target)


def test_a_copy_then_delete_rename_is_not_complete_until_every_file_has_arrived(tmp_path, monkeypatch):
    target = tmp_path / "prepared" / "abc"
    building = build(building_folder(target))
    rename = CopyThenDeleteRename(is_complete)
    monkeypatch.setattr(Path, "rename", lambda source, target: rename(source, target))
    assert commit(building, target)
    assert rename.seen[-1] is True and not any(rename.seen[:-1]), rename.seen  # complete only at the very end
    assert len(rename.seen) == 8 and not building.exists()


def test_the_prepared_data_and_checkpoint_readers_check_the_marker_not_the_folder(tmp_path):
    from training.prepared_data import INFO_NAME, existing
    from training.rank.checkpoints import COMPLETE_MARKER, list_checkpoints

    prepared = tmp_path / "cache" / "abc"
    (prepared).mkdir(parents=True)
    (prepared / INFO_NAME).write_text(json.dumps({"records": 3}))
    (prepared / "data-00000-of-00001.arrow").write_bytes(b"x" * 100)
    assert existing(tmp_path / "cache", "abc") is None  # there, with its info file, but not marked
    mark_complete(prepared, fingerprint="abc")
    assert existing(tmp_path / "cache", "abc").info == {"records": 3}
    (prepared / "data-00000-of-00001.arrow").write_bytes(b"x" * 40)  # a file still arriving
    assert existing(tmp_path / "cache", "abc") is None

    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"w" * 64)
    mark_complete(checkpoint, COMPLETE_MARKER, global_step=2, world_size=2)
    assert list_checkpoints(tmp_path / "out") == [checkpoint]
    (checkpoint / "model.safetensors").unlink()
    assert list_checkpoints(tmp_path / "out") == []
    # A checkpoint marked before markers named their files still counts.
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"global_step": 2, "world_size": 2}))
    assert list_checkpoints(tmp_path / "out") == [checkpoint]


def test_a_complete_target_wins_and_an_incomplete_one_is_replaced(tmp_path):
    target = tmp_path / "abc"
    first = build(tmp_path / ".building-abc@h@1")
    assert commit(first, target)
    second = build(tmp_path / ".building-abc@h@2")
    assert not commit(second, target) and not second.exists() and is_complete(target)
    (target / "info.json").write_text("cut")  # a copy cut short
    third = build(tmp_path / ".building-abc@h@3")
    assert commit(third, target) and is_complete(target)
    replacement = build(tmp_path / ".building-abc@h@4")
    (replacement / "info.json").write_text('{"records": 4}')
    mark_complete(replacement, fingerprint="abc")
    assert commit(replacement, target, replace=True) and json.loads((target / "info.json").read_text()) == {
        "records": 4
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc"]
    with pytest.raises(RuntimeError, match="is not marked complete"):
        unmarked = tmp_path / ".building-x@h@5"
        unmarked.mkdir()
        commit(unmarked, tmp_path / "x")


def test_builds_whose_owner_is_gone_are_swept_and_live_ones_kept(tmp_path, caplog, monkeypatch):
    import socket

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    here = socket.gethostname()
    abandoned = tmp_path / f".building-abc@{here}@{dead_pid}"
    mine = building_folder(tmp_path / "def")
    foreign_old = tmp_path / ".building-ghi@another-host-1@123"
    foreign_new = tmp_path / ".building-jkl@another-host-1@124"
    for folder in (abandoned, mine, foreign_old, foreign_new):
        folder.mkdir()
    old = foreign_old.stat().st_mtime - folder_commit.FOREIGN_BUILD_STALE_SECONDS - 60
    os.utime(foreign_old, (old, old))
    removed = sweep_abandoned_builds(tmp_path)
    assert sorted(removed) == sorted([abandoned, foreign_old])
    assert mine.exists() and foreign_new.exists()
    assert f"its build was abandoned (owner pid {dead_pid} on {here} is gone)" in caplog.text
