"""Generated broken inputs: each one loads record for record, or fails with our error naming the file, the line or
record, and the field; never a traceback from datasets or pyarrow, never a silently dropped record."""

from __future__ import annotations

import codecs
import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.data import DatasetRecordError, read_records, records_dataset

FIELDS = ("instruction", "response", "context", "category")
REQUIRED = ("instruction", "response")
MISSING = object()

values = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from(["", "   ", "\n\t"]),
    st.none(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
good_text = st.text(min_size=1, max_size=12).filter(str.strip)
records = st.fixed_dictionaries(
    {field: st.one_of(st.just(MISSING), good_text, values) for field in FIELDS},
    optional={"extra_field": values},
).map(lambda r: {k: v for k, v in r.items() if v is not MISSING})
# Mostly good records, so that files that load are generated too.
good_records = st.fixed_dictionaries(
    {"instruction": good_text, "response": good_text}, optional={"context": good_text, "category": good_text}
)
any_records = st.lists(st.one_of(good_records, good_records, records), min_size=0, max_size=6)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bad_fields(record: Any) -> set[str] | None:
    """The fields that make ``record`` invalid (None: it is valid); a non-object record is bad as a whole."""
    if not isinstance(record, dict):
        return {"<record>"}
    bad = set()
    for field in FIELDS:
        value = record.get(field)
        if field in REQUIRED and not (isinstance(value, str) and value.strip()):
            bad.add(field)
        if field not in REQUIRED and value is not None and not isinstance(value, str):
            bad.add(field)
    return bad or None


def clean(record: dict) -> dict[str, str]:
    return {field: record.get(field) or "" for field in FIELDS}


def check(path: Path, items: list[Any], positions: list[str]) -> None:
    """Read ``path``; expect its valid items back, or our error at the first bad item's position."""
    first_bad = next((i for i, item in enumerate(items) if bad_fields(item)), None)
    try:
        loaded = read_records(str(path))
    except DatasetRecordError as err:
        message = str(err)
        assert str(path) in message
        if first_bad is None:
            assert not items and "no records found" in message
            return
        assert f"{positions[first_bad]}:" in message, (message, positions[first_bad])
        named = bad_fields(items[first_bad])
        assert any(f"field '{field}'" in message for field in named) or named == {"<record>"}, message
    else:
        assert first_bad is None and items, "a bad input loaded"
        assert loaded == [clean(item) for item in items]  # record for record, none dropped


@SETTINGS
@given(items=any_records, bom=st.booleans(), blank_lines=st.booleans())
def test_jsonl_files_load_or_name_the_line_and_field(items, bom, blank_lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "records.jsonl"
        lines = []
        for item in items:
            lines.append(json.dumps(item))
            if blank_lines:
                lines.append("")
        data = "\n".join(lines).encode()
        path.write_bytes((codecs.BOM_UTF8 if bom else b"") + data)
        positions = [f"line {1 + index * (2 if blank_lines else 1)}" for index in range(len(items))]
        check(path, items, positions)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=any_records)
def test_the_arrow_path_training_reads_gives_the_same_records_or_the_same_error(items):
    """Training streams records into Arrow (records_dataset) instead of a list: the same records, or the same error."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "records.jsonl"
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
        try:
            expected: Any = read_records(str(path))
        except DatasetRecordError as err:
            expected = str(err)
        try:
            loaded: Any = list(records_dataset(str(path), cache_dir=Path(folder) / "cache"))
        except DatasetRecordError as err:
            loaded = str(err)
        assert loaded == expected


@SETTINGS
@given(
    items=st.lists(good_records, min_size=1, max_size=5),
    broken_at=st.integers(0, 4),
    damage=st.sampled_from(["truncate", "latin1", "array"]),
)
def test_damaged_jsonl_lines_are_named(items, broken_at, damage):
    broken_at %= len(items)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "records.jsonl"
        lines = [json.dumps(item).encode() for item in items]  # ASCII: a cut never splits a character
        if damage == "truncate":
            lines[broken_at] = lines[broken_at][: len(lines[broken_at]) // 2]
            expected = "not valid JSON"
        elif damage == "latin1":
            lines[broken_at] = lines[broken_at].replace(b'"instruction": "', b'"instruction": "caf\xe9 ', 1)
            expected = "not UTF-8 text"
        else:  # a JSON array where JSON Lines is expected
            lines[broken_at] = json.dumps([items[broken_at]]).encode()
            expected = "expected a JSON object, got list"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            read_records(str(path))
        except DatasetRecordError as err:
            assert f"{path}, line {broken_at + 1}: {expected}" in str(err), str(err)
        else:
            raise AssertionError("a damaged line loaded")


@SETTINGS
@given(items=any_records, wrapped=st.booleans())
def test_json_files_load_or_name_the_record_and_field(items, wrapped):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "records.json"
        path.write_text(json.dumps({"data": items} if wrapped else items))
        check(path, items, [f"record {index + 1}" for index in range(len(items))])


@SETTINGS
@given(items=st.lists(good_records, min_size=1, max_size=4), response_type=st.sampled_from(["string", "int", "absent"]))
def test_parquet_columns_missing_or_of_the_wrong_type_are_named(items, response_type):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "records.parquet"
        columns = {"instruction": [item["instruction"] for item in items]}
        if response_type == "string":
            columns["response"] = [item["response"] for item in items]
        elif response_type == "int":
            columns["response"] = list(range(len(items)))
        pyarrow.parquet.write_table(pyarrow.table(columns), path)
        expected = [{"instruction": item["instruction"], "response": item["response"]} for item in items]
        if response_type != "string":
            expected[0]["response"] = 0 if response_type == "int" else None
        check(path, expected, [f"record {index + 1}" for index in range(len(items))])


@SETTINGS
@given(
    groups=st.lists(
        st.tuples(st.sampled_from([".jsonl", ".json", ".parquet"]), st.lists(good_records, min_size=1, max_size=3)),
        min_size=1,
        max_size=3,
    )
)
def test_a_folder_of_mixed_files_loads_every_record(groups):
    with tempfile.TemporaryDirectory() as folder:
        expected = []
        for number, (suffix, items) in enumerate(groups):
            path = Path(folder) / f"part-{number}{suffix}"
            if suffix == ".jsonl":
                path.write_text("\n".join(json.dumps(item) for item in items))
            elif suffix == ".json":
                path.write_text(json.dumps(items))
            else:
                pyarrow.parquet.write_table(pyarrow.Table.from_pylist([clean(item) for item in items]), path)
            expected += [clean(item) for item in items]
        (Path(folder) / "README.md").write_text("not data")
        assert read_records(folder) == expected


def test_a_folder_with_a_broken_file_names_that_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "i", "response": "r"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "i", "response": None}) + "\n")
    try:
        read_records(str(tmp_path))
    except DatasetRecordError as err:
        assert f"{tmp_path / 'b.jsonl'}, line 1: field 'response' is missing" == str(err)
    else:
        raise AssertionError("the broken file loaded")


def test_an_empty_file_and_an_unreadable_parquet_file_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    check(empty, [], [])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    try:
        read_records(str(broken))
    except DatasetRecordError as err:
        assert f"{broken}: not a readable Parquet file" in str(err)
    else:
        raise AssertionError("a broken Parquet file loaded")
