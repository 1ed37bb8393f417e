"""Your data in your columns: ``--columns`` maps them onto the dolly fields, for files, folders and saved datasets
(the hub's form), errors name your column, and the run's record keeps the mapping for ``--config``."""

from __future__ import annotations

import csv
import json

import pytest
from datasets import Dataset
from helpers import assert_ok, quick_training_args, run_trainer

from training.columns import Columns, normalize_columns
from training.data import DatasetRecordError, load_training_dataset, read_records
from training.rank.run_record import RUN_CONFIG_NAME, read_run_config

ALPACA = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Who wrote it?", "input": "Hamlet is a play by Shakespeare.", "output": "Shakespeare."},
]
QA_COLUMNS = "instruction=question,context=passage,response=answer,category=kind"


def alpaca_records(sample_path) -> list[dict]:
    """The project's sample records, rewritten in the Alpaca layout."""
    rows = [json.loads(line) for line in sample_path.read_text().splitlines() if line.strip()]
    return [{"instruction": r["instruction"], "input": r["context"], "output": r["response"]} for r in rows]


def qa_records(sample_path) -> list[dict]:
    rows = [json.loads(line) for line in sample_path.read_text().splitlines() if line.strip()]
    return [
        {"question": r["instruction"], "passage": r["context"], "answer": r["response"], "kind": r["category"]}
        for r in rows
    ]


def write_csv(path, rows: list[dict]):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_alpaca_preset_and_a_mapping_are_parsed_and_written_out():
    assert Columns.parse("alpaca") == Columns(context="input", response="output")
    assert normalize_columns("alpaca") == "context=input,response=output"
    assert normalize_columns("response = answer, instruction=question") == "instruction=question,response=answer"
    assert normalize_columns("") is None and normalize_columns("dolly") is None
    for bad, message in [
        ("answer", "is not FIELD=COLUMN"),
        ("reply=answer", "unknown field 'reply'"),
        ("response=a,response=b", "mapped twice"),
        ("context=x,response=x", "column 'x' holds more"),
    ]:
        with pytest.raises(ValueError, match=message):
            Columns.parse(bad)


def test_an_alpaca_file_reads_as_dolly_records(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA))
    with pytest.raises(DatasetRecordError, match=r"alpaca\.json, record 1: field 'response' is missing"):
        read_records(str(path))  # without the mapping: what users met before
    records = read_records(str(path), "alpaca")
    assert records[1] == {
        "instruction": "Who wrote it?",
        "response": "Shakespeare.",
        "context": "Hamlet is a play by Shakespeare.",
        "category": "",
    }
    dataset = load_training_dataset(str(path), "alpaca")
    assert "Input:\nHamlet is a play by Shakespeare." in dataset[1]["text"]


def test_a_bad_record_is_named_by_the_users_column_file_and_line(tmp_path, sample_path):
    rows = qa_records(sample_path)[:6]
    rows[5]["answer"] = "  "
    path = write_csv(tmp_path / "export.csv", rows)
    with pytest.raises(DatasetRecordError) as error:
        read_records(str(path), QA_COLUMNS)
    assert str(error.value) == f"{path}, line 7: column 'answer' (the response) is empty"  # line 1 is the header
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows[:5]) + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(
        DatasetRecordError, match=r"records\.jsonl, line 6: column 'answer' \(the response\) is missing"
    ):
        read_records(str(jsonl), QA_COLUMNS)


def test_csv_rows_parquet_and_saved_datasets_are_mapped(tmp_path, sample_path):
    rows = qa_records(sample_path)
    csv_records = read_records(str(write_csv(tmp_path / "export.csv", rows)), QA_COLUMNS)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "table.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))  # a hub dataset's rows, as load_dataset gives them
    expected = read_records(str(sample_path))
    assert csv_records == expected
    assert read_records(str(tmp_path / "table.parquet"), QA_COLUMNS) == expected
    assert read_records(str(tmp_path / "saved"), QA_COLUMNS) == expected


def test_a_csv_row_with_more_cells_than_columns_is_named(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("instruction,response\nSay hi.,Hi.\nSay bye.,Bye.,extra\n")
    with pytest.raises(DatasetRecordError, match=r"broken\.csv, line 3: more cells than the header has columns"):
        read_records(str(path))


@pytest.mark.launch
@pytest.mark.parametrize("layout", ["alpaca", "qa-csv"])
def test_your_columns_train_under_the_launcher_and_replay(layout, tiny_model_dir, sample_path, tmp_path):
    if layout == "alpaca":
        data, columns = tmp_path / "alpaca.jsonl", "alpaca"
        data.write_text("".join(json.dumps(row) + "\n" for row in alpaca_records(sample_path)))
    else:
        data, columns = write_csv(tmp_path / "export.csv", qa_records(sample_path)), QA_COLUMNS
    out = tmp_path / "out"
    result = run_trainer(
        quick_training_args(tiny_model_dir, data, out, "--columns", columns, "--max-steps", "2", "--no-mlflow"),
        ranks=2,
    )
    assert_ok(result)
    record = json.loads((out / RUN_CONFIG_NAME).read_text())
    assert record["settings"]["columns"] == normalize_columns(columns)
    assert record["data"]["records"] == 41 and record["data"]["train_records"] == 33
    assert read_run_config(out / RUN_CONFIG_NAME)["columns"] == normalize_columns(columns)  # --config replays it
