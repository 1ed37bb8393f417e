"""The training data prepared once per run into a fingerprinted Arrow dataset: read and tokenized by one process,
reused by the next run, checked by a resume; and the handoff the other ranks wait through."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from datetime import timedelta

import pytest
from data_counting import counts
from helpers import assert_ok, run_trainer, zero3_run_args

from training.data import read_records
from training.prepared_data import (
    INFO_NAME,
    DataSpec,
    changed_parts,
    fingerprint_of,
    fingerprint_parts,
    prepare_data,
    split_held_out,
)
from training.rank import handoff
from training.rank.modeling import load_tokenizer

EXTRA_RECORD = {"instruction": "Name a prime number.", "context": "", "response": "Seven.", "category": "open_qa"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_the_prepared_dataset_holds_every_record_checked_tokenized_and_shuffled(tokenizer, sample_path, tmp_path):
    spec = DataSpec(str(sample_path), None, 2048, 42)
    prepared = prepare_data(spec, tokenizer, tmp_path)
    dataset = prepared.load()
    records = read_records(str(sample_path))
    assert prepared.info["records"] == len(records) == dataset.num_rows
    # Every record once, its raw fields beside its tokens, in the seed's shuffled order (not the file's).
    assert sorted(dataset["instruction"]) == sorted(r["instruction"] for r in records)
    assert dataset["instruction"] != [r["instruction"] for r in records]
    assert dataset["length"] == [len(ids) for ids in dataset["input_ids"]]
    assert [p.name for p in tmp_path.iterdir()] == [prepared.fingerprint]  # no build folder left behind
    # The same spec again is the same folder, reused; another seed is another dataset.
    assert prepare_data(spec, tokenizer, tmp_path).path == prepared.path
    other = prepare_data(DataSpec(str(sample_path), None, 2048, 7), tokenizer, tmp_path)
    assert other.path != prepared.path and other.load()["instruction"] != dataset["instruction"]


def test_the_fingerprint_names_each_part_that_changed(tokenizer, sample_path, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(sample_path, data)
    base = fingerprint_parts(DataSpec(str(data), None, 2048, 42), tokenizer)
    with data.open("a") as handle:
        handle.write(json.dumps(EXTRA_RECORD) + "\n")
    edited = fingerprint_parts(DataSpec(str(data), "alpaca", 1024, 42), tokenizer)
    assert changed_parts(base, edited) == [
        "the training data's content",
        "the column mapping (--columns)",
        "--max-length",
    ]
    assert fingerprint_of(base) != fingerprint_of(edited)
    assert changed_parts(base, dict(base)) == []


def test_the_tokenizer_is_fingerprinted_by_what_it_does_not_by_how_a_library_writes_it(
    tokenizer, tiny_model_dir, tmp_path, monkeypatch
):
    """The same vocabulary and merges written two ways (``tokenizers`` wrote merges as "a b" strings before 0.20 and
    as pairs since, and adds fields release by release): one fingerprint. A tokenizer that gives a probe text other
    ids: another."""
    import training.prepared_data as prepared_data
    from training.prepared_data import backend_definition, merges_of, tokenizer_digest

    digest = tokenizer_digest(tokenizer)
    definition = backend_definition(tokenizer)
    assert merges_of(definition) and all(isinstance(merge, list) for merge in definition["model"]["merges"])
    older = json.loads(json.dumps(definition))
    older["model"]["merges"] = [" ".join(merge) for merge in definition["model"]["merges"]]
    older["model"].pop("ignore_merges", None)
    older["a_field_a_later_release_writes"] = {"default": True}
    monkeypatch.setattr(prepared_data, "backend_definition", lambda tokenizer: older)
    assert tokenizer_digest(tokenizer) == digest  # another serialisation of the same tokenizer
    monkeypatch.undo()
    other = load_tokenizer(str(tiny_model_dir))
    other.add_tokens(["Zoë"])  # the probe text now splits differently
    assert other("Zoë")["input_ids"] != tokenizer("Zoë")["input_ids"]
    assert tokenizer_digest(other) != digest


def test_a_change_to_the_code_that_shapes_a_record_changes_the_fingerprint(tokenizer, sample_path, monkeypatch):
    import training.preprocess as preprocess

    spec = DataSpec(str(sample_path), None, 2048, 42)
    before = fingerprint_parts(spec, tokenizer)

    def mask_prompt(input_ids, response_start):  # a fix to the masking: the data it prepares would differ
        return [-100] * (response_start + 1) + list(input_ids[response_start + 1 :])

    monkeypatch.setattr(preprocess, "mask_prompt", mask_prompt)
    after = fingerprint_parts(spec, tokenizer)
    assert changed_parts(before, after) == ["the prompt template or the preparation"]


def test_a_build_that_loses_the_race_uses_the_winners_copy(tokenizer, sample_path, tmp_path, monkeypatch):
    import training.prepared_data as prepared_data

    spec = DataSpec(str(sample_path), None, 2048, 42)
    real_build = prepared_data._build

    def build_while_another_run_finishes_first(*args, **kwargs):
        info = real_build(*args, **kwargs)
        monkeypatch.setattr(prepared_data, "_build", real_build)
        prepare_data(spec, tokenizer, tmp_path)  # the other run: done while this one was building
        return info

    monkeypatch.setattr(prepared_data, "_build", build_while_another_run_finishes_first)
    prepared = prepare_data(spec, tokenizer, tmp_path)
    assert (prepared.path / INFO_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [prepared.fingerprint]


def test_the_held_out_split_is_seeded_disjoint_and_refuses_to_leave_nothing(tokenizer, sample_path, tmp_path):
    dataset = prepare_data(DataSpec(str(sample_path), None, 2048, 42), tokenizer, tmp_path).load()
    train, test = split_held_out(dataset, 8, 42)
    again_train, again_test = split_held_out(dataset, 8, 42)
    assert test["instruction"] == again_test["instruction"] and train.num_rows == dataset.num_rows - 8
    assert not set(train["instruction"]) & set(test["instruction"])
    assert split_held_out(dataset, 0.1, 42)[1].num_rows == 5  # a ratio rounds up: ceil(4.1)
    assert split_held_out(dataset, 0, 42)[1] is None
    with pytest.raises(ValueError, match="41 records held out leaves none to train on"):
        split_held_out(dataset, 41, 42)


# ---- the handoff: the other ranks' wait has an end ----


@pytest.fixture
def store():
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))


def test_a_waiting_rank_gets_the_result_or_the_main_processs_error(store, monkeypatch):
    keys = handoff._Keys("result")
    main = threading.Thread(target=handoff._work_and_publish, args=(store, keys, lambda: {"path": "/data"}))
    main.start()
    assert json.loads(handoff._wait_for(store, keys, timeout_s=30, what="prepare")) == {"path": "/data"}
    main.join()

    monkeypatch.setattr(handoff, "world_size", lambda: 2)
    keys = handoff._Keys("error")

    def failing_main():
        with pytest.raises(ValueError):
            handoff._work_and_publish(store, keys, lambda: (_ for _ in ()).throw(ValueError("line 6: bad field")))

    main = threading.Thread(target=failing_main)
    started = time.monotonic()
    main.start()
    with pytest.raises(handoff.HandoffError, match="the main process failed to prepare: ValueError: line 6: bad field"):
        handoff._wait_for(store, keys, timeout_s=30, what="prepare")
    main.join()
    assert time.monotonic() - started < handoff.ACKNOWLEDGE_WAIT_S  # the main process went on once it was read


def test_a_waiting_rank_gives_up_on_a_silent_main_process_and_at_its_timeout(store, monkeypatch):
    monkeypatch.setattr(handoff, "SILENT_LIMIT_S", 1.0)
    keys = handoff._Keys("silent")
    store.set(keys.beat, "0")  # one beat, then nothing: the main process died
    with pytest.raises(handoff.HandoffError, match="no sign of life from the main process for 1 s"):
        handoff._wait_for(store, keys, timeout_s=30, what="prepare")

    monkeypatch.setattr(handoff, "SILENT_LIMIT_S", 120.0)
    monkeypatch.setattr(handoff, "HEARTBEAT_S", 0.2)
    keys = handoff._Keys("slow")
    release = threading.Event()
    main = threading.Thread(target=handoff._work_and_publish, args=(store, keys, lambda: release.wait(30)))
    main.start()
    try:
        with pytest.raises(
            handoff.HandoffError, match=r"waited 1 s for the main process to prepare \(--wait-timeout\)"
        ):
            handoff._wait_for(store, keys, timeout_s=1, what="prepare")
    finally:
        release.set()
        main.join()


# ---- real launches ----


@pytest.mark.launch
def test_a_two_rank_run_reads_and_tokenizes_once_and_the_next_run_reuses_it(tiny_model_dir, sample_path, tmp_path):
    def counted_run(name: str):
        """A 2-rank run into ``tmp_path/name``, with who read and who tokenized the records."""
        notes = tmp_path / f"counts-{name}"
        notes.mkdir()
        run = run_trainer(
            zero3_run_args(tiny_model_dir, sample_path, tmp_path / name, "--max-steps", "2"),
            ranks=2,
            module="data_counting",
            env={"DOLLY_COUNT_DIR": str(notes)},
        )
        assert_ok(run)
        return run, counts(notes)

    _, first = counted_run("first")
    assert first == {"read": {"0": 1}, "tokenize": {"0": 41}}  # rank 1 neither read nor tokenized
    prepared = list((tmp_path / "prepared_data").iterdir())
    assert len(prepared) == 1
    record = json.loads((tmp_path / "first" / "run_config.json").read_text())
    assert record["data"]["fingerprint"] == prepared[0].name

    second_run, second = counted_run("second")
    assert second == {"read": {}, "tokenize": {}}
    assert f"Reusing prepared dataset {prepared[0]}" in second_run.stdout + second_run.stderr


@pytest.mark.launch
def test_a_resume_on_changed_data_is_refused_before_the_model_loads_unless_allowed(
    tiny_model_dir, sample_path, tmp_path
):
    data = tmp_path / "data.jsonl"
    shutil.copy(sample_path, data)
    out = tmp_path / "out"
    assert_ok(run_trainer(zero3_run_args(tiny_model_dir, data, out, "--max-steps", "2"), ranks=2))
    with data.open("a") as handle:
        handle.write(json.dumps(EXTRA_RECORD) + "\n")

    refused = run_trainer(zero3_run_args(tiny_model_dir, data, out, "--max-steps", "4", "--resume"), ranks=2)
    log = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert f"--resume: the data is not what {out / 'checkpoint-2'} was trained on (the training data's content" in log
    assert "give --allow-changed-data to continue anyway" in log
    assert "Loading model" not in log
    assert not (out / "checkpoint-4").exists()

    allowed = run_trainer(
        zero3_run_args(tiny_model_dir, data, out, "--max-steps", "4", "--resume", "--allow-changed-data"),
        ranks=2,
    )
    assert_ok(allowed)
    assert (
        "Resuming on changed data (--allow-changed-data): the training data's content differ"
        in allowed.stderr + allowed.stdout
    )
    assert (out / "checkpoint-4").is_dir()


def test_a_notebook_run_reads_its_source_once_and_a_second_run_once_again(tiny_model_dir, sample_path, tmp_path):
    """The driver prepares (the digest taken as the records are read), the plan hands the digest to rank 0, which
    finds the prepared data without a read: the source's bytes, once per run (counted through the reader)."""
    import dataclasses

    from training.data import SOURCE_BYTES_READ
    from training.driver.notebook import prepare_training_data
    from training.rank.training_data import prepare_on_main
    from training.settings import TrainSettings

    source = tmp_path / "records.jsonl"
    shutil.copy(sample_path, source)
    settings = TrainSettings(
        input_model=str(tiny_model_dir), training_dataset=str(source), local_output_dir=str(tmp_path / "runs" / "a")
    )
    for run in ("first", "second"):  # the second reuses the prepared data
        SOURCE_BYTES_READ.clear()
        digest = prepare_training_data(settings)  # the notebook's driver
        answer = prepare_on_main(dataclasses.replace(settings, source_digest=digest), 2048, None)  # rank 0
        assert dict(SOURCE_BYTES_READ) == {str(source): source.stat().st_size}, run
        assert (
            answer["info"]["parts"]["source"] == digest == f"sha256:{hashlib.sha256(source.read_bytes()).hexdigest()}"
        )
    assert len([p for p in (tmp_path / "runs" / "prepared_data").iterdir()]) == 1
