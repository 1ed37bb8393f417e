"""Which checkpoint a resumed run trusts, what it clears away, and how an output folder is published."""

import json
import os

import pytest

from training.rank.checkpoints import COMPLETE_MARKER, list_checkpoints, rotate_checkpoints
from training.rank.saving import OutputExistsError, is_finished_output, prepare_output_dir, publish_dir


def make_checkpoint(folder, step, complete=True):
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")  # the Trainer writes this even when another rank died
    if complete:
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"global_step": step}))
    return checkpoint


def test_resume_takes_the_numerically_newest_complete_checkpoint_and_clears_incomplete_ones(tmp_path):
    for step in (2, 10):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 11, complete=False)
    (tmp_path / ".staging-final").mkdir()
    assert prepare_output_dir(tmp_path, resume=True, overwrite=False) == tmp_path / "checkpoint-10"
    assert not (tmp_path / "checkpoint-11").exists() and not (tmp_path / ".staging-final").exists()
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-10"]


def test_other_ranks_only_read_the_folder(tmp_path):
    make_checkpoint(tmp_path, 4, complete=False)
    make_checkpoint(tmp_path, 2)
    assert (
        prepare_output_dir(tmp_path, resume=True, overwrite=False, is_main_process=False) == tmp_path / "checkpoint-2"
    )
    assert (tmp_path / "checkpoint-4").exists()


def test_rotation_keeps_the_newest_complete_checkpoints_only(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 8, complete=False)  # being written: it must not push a complete one out
    rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_rotation_takes_the_completeness_marker_away_before_the_shards(tmp_path, monkeypatch):
    import shutil

    import training.rank.checkpoints as checkpoints

    for step in (2, 4):
        make_checkpoint(tmp_path, step)

    def deletion_cut_short(path, ignore_errors=False):  # the process dies while deleting
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.shutil, "rmtree", deletion_cut_short)
    with pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(tmp_path, keep=1)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", shutil.rmtree)
    # What is left of checkpoint-2 no longer claims to be complete: a resume cannot pick it.
    assert (tmp_path / "checkpoint-2").is_dir() and list_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]


def test_a_non_empty_folder_is_refused_and_overwrite_clears_it(tmp_path):
    make_checkpoint(tmp_path, 2)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        prepare_output_dir(tmp_path, resume=False, overwrite=False)
    assert prepare_output_dir(tmp_path, resume=False, overwrite=True) is None
    assert list(tmp_path.iterdir()) == []


def test_publishing_writes_the_loader_entry_file_last_and_unpublishes_the_old_model_first(tmp_path, monkeypatch):
    output, staging = tmp_path / "out", tmp_path / "out" / ".staging-final"
    staging.mkdir(parents=True)
    (output / "config.json").write_text("old")
    (output / "model.safetensors").write_text("old")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (staging / name).write_text("new")

    moved = []
    real_replace = os.replace

    def recording_replace(source, target):
        moved.append((os.path.basename(target), is_finished_output(output)))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    publish_dir(staging, output)
    assert moved[-1] == ("config.json", False)  # nothing looked finished until the last move
    assert all(not finished for _, finished in moved)
    assert is_finished_output(output) and (output / "model.safetensors").read_text() == "new"
