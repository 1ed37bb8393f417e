"""Every record is checked; a bad one stops the run naming the file, the line or record, and the field."""

import json

import pytest
from datasets import Dataset

from training.data import DatasetRecordError, load_training_dataset, read_records

GOOD = {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"}


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl_with(tmp_path, bad_record_line: str):
    return write_jsonl(tmp_path / "records.jsonl", [json.dumps(GOOD), json.dumps(GOOD), bad_record_line])


@pytest.mark.parametrize(
    "bad_line, field, problem",
    [
        ('{"instruction": "x", "response": ', None, "not valid JSON"),
        (json.dumps({"context": "", "response": "r"}), "instruction", "is missing"),
        (json.dumps({"instruction": "i", "context": ""}), "response", "is missing"),
        (json.dumps({"instruction": "  ", "response": "r"}), "instruction", "is empty"),
        (json.dumps({"instruction": "i", "response": ""}), "response", "is empty"),
        (json.dumps({"instruction": 3, "response": "r"}), "instruction", "must be a string, got int"),
        (json.dumps({"instruction": "i", "response": ["r"]}), "response", "must be a string, got list"),
        (json.dumps({"instruction": "i", "response": "r", "context": {"a": 1}}), "context", "must be a string"),
        (json.dumps({"instruction": "i", "response": "r", "category": 7}), "category", "must be a string"),
        (json.dumps(["not", "an", "object"]), None, "expected a JSON object"),
    ],
)
def test_bad_jsonl_record_names_file_line_and_field(tmp_path, bad_line, field, problem):
    path = jsonl_with(tmp_path, bad_line)
    with pytest.raises(DatasetRecordError) as err:
        read_records(str(path))
    message = str(err.value)
    assert f"{path}, line 3" in message
    assert problem in message
    if field:
        assert f"field '{field}'" in message


def test_json_array_names_the_record(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([GOOD, {"instruction": "i", "response": None}]))
    with pytest.raises(DatasetRecordError, match=r"records\.json, record 2: field 'response' is missing"):
        read_records(str(path))


def test_json_is_read_as_a_stream_whatever_its_layout_and_a_broken_record_is_named(tmp_path):
    """A .json array, a {"data": [...]} object, and JSON Lines named .json (as Dataset.to_json writes): the same
    records, each named by file and number; a broken record in each is named too."""
    records = [GOOD, {**GOOD, "instruction": "Second?"}, {**GOOD, "instruction": "Third?"}]
    layouts = {
        "array.json": json.dumps(records, indent=2),
        "wrapped.json": json.dumps({"version": 1, "data": records}, indent=2),
        "lines.json": "".join(json.dumps(record) + "\n" for record in records),
    }
    for name, text in layouts.items():
        (tmp_path / name).write_text(text)
        assert [r["instruction"] for r in read_records(str(tmp_path / name))] == [r["instruction"] for r in records]
    (tmp_path / "array.json").write_text(json.dumps(records[:2])[:-1] + ', {"instruction": "x", "resp')
    with pytest.raises(DatasetRecordError, match=r"array\.json, record 3: not valid JSON"):
        read_records(str(tmp_path / "array.json"))
    lines = layouts["lines.json"].splitlines()
    (tmp_path / "lines.json").write_text("\n".join([lines[0], lines[1][:-5], lines[2]]) + "\n")
    with pytest.raises(DatasetRecordError, match=r"lines\.json, line 2: not valid JSON"):
        read_records(str(tmp_path / "lines.json"))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [GOOD, {"instruction": "i"}]}))
    with pytest.raises(DatasetRecordError, match=r"wrapped\.json, record 2: field 'response' is missing"):
        read_records(str(tmp_path / "wrapped.json"))


def test_a_json_files_digest_is_taken_as_it_is_read(tmp_path):
    """The .json reader looks for a byte-order mark and goes back to the start: the digest is still the one taken as
    the records were read, so the file is not read again for it (only the layout's first look reads ahead)."""
    import hashlib

    from training.data import JSON_PEEK_BYTES, SOURCE_BYTES_READ, source_fingerprint

    path = tmp_path / "records.json"
    path.write_text(json.dumps([{**GOOD, "instruction": f"Question {n}?"} for n in range(2000)]))
    size = path.stat().st_size
    SOURCE_BYTES_READ.clear()
    assert len(read_records(str(path))) == 2000
    read = SOURCE_BYTES_READ[str(path)]
    digest = source_fingerprint(str(path), after_read=True)
    assert digest == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert SOURCE_BYTES_READ[str(path)] == read <= size + min(size, JSON_PEEK_BYTES) + 3


def test_parquet_and_saved_folder_are_read_and_checked(tmp_path):
    Dataset.from_list([GOOD, {**GOOD, "response": ""}]).to_parquet(str(tmp_path / "r.parquet"))
    with pytest.raises(DatasetRecordError, match=r"r\.parquet, record 2: field 'response' is empty"):
        read_records(str(tmp_path / "r.parquet"))
    Dataset.from_list([GOOD, GOOD]).save_to_disk(str(tmp_path / "saved"))
    assert len(read_records(str(tmp_path / "saved"))) == 2


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="training dataset not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="training dataset not found: data/nope.jsonl"):
        read_records("data/nope.jsonl")  # relative, and shaped like a hub name: still a local file


def test_unsupported_file_type(tmp_path):
    (tmp_path / "r.tsv").write_text("a\tb\n")
    with pytest.raises(ValueError, match=r"unsupported file type '.tsv' \(use .jsonl, .json, .csv or .parquet\)"):
        read_records(str(tmp_path / "r.tsv"))


def test_sample_data_covers_every_category_with_and_without_context(sample_path):
    records = read_records(str(sample_path))
    categories = {r["category"] for r in records}
    assert categories == {
        "open_qa",
        "general_qa",
        "classification",
        "closed_qa",
        "brainstorming",
        "information_extraction",
        "summarization",
        "creative_writing",
    }
    assert any(r["context"] for r in records) and any(not r["context"] for r in records)


def test_load_training_dataset_adds_dolly_text(sample_path):
    dataset = load_training_dataset(str(sample_path))
    with_context = next(r for r in dataset if r["context"])
    assert with_context["text"].endswith(f"{with_context['response']}\n\n### End")
    assert f"Input:\n{with_context['context']}" in with_context["text"]


def test_real_dolly_records_validate(shared_dolly_sample):
    records = read_records(str(shared_dolly_sample))
    assert len(records) == 1144
    assert sum(bool(r["context"]) for r in records) == 332
