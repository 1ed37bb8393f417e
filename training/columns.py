"""Which of the user's columns hold the dolly fields: ``--columns instruction=question,context=passage,response=answer``,
or a preset (``alpaca``: ``instruction``, ``input``, ``output``). Standard library only: the settings check it."""

from __future__ import annotations

from dataclasses import dataclass, fields

PRESETS = {"dolly": "", "alpaca": "instruction=instruction,context=input,response=output"}


@dataclass(frozen=True)
class Columns:
    """Which of the user's columns holds each dolly field (dolly's own names unless mapped)."""

    instruction: str = "instruction"
    context: str = "context"
    response: str = "response"
    category: str = "category"

    @classmethod
    def parse(cls, text: str | None) -> Columns:
        """``instruction=question,context=passage,response=answer`` (fields not named keep dolly's name), a preset
        name (``alpaca``, ``dolly``), or empty for dolly's columns. ``ValueError`` says what is wrong."""
        text = (text or "").strip()
        text = PRESETS.get(text, text)
        known = [item.name for item in fields(cls)]
        mapping: dict[str, str] = {}
        for part in filter(None, (piece.strip() for piece in text.split(","))):
            field, separator, column = (piece.strip() for piece in part.partition("="))
            if not separator or not column:
                raise ValueError(f"'{part}' is not FIELD=COLUMN (for example response=answer)")
            if field not in known:
                raise ValueError(f"unknown field '{field}'; the fields are {', '.join(known)}")
            if field in mapping:
                raise ValueError(f"field '{field}' is mapped twice")
            mapping[field] = column
        columns = cls(**mapping)
        taken = [getattr(columns, name) for name in known]
        clashing = sorted({column for column in taken if taken.count(column) > 1})
        if clashing:
            raise ValueError(f"column {', '.join(repr(c) for c in clashing)} holds more than one field")
        return columns

    @property
    def mapped(self) -> bool:
        return self != Columns()

    def describe(self, field: str) -> str:
        """How an error names a field: dolly's ``field 'response'``, or the user's ``column 'answer' (the response)``."""
        column = getattr(self, field)
        return f"field '{field}'" if column == field else f"column '{column}' (the {field})"

    def text(self) -> str:
        """The mapping as ``--columns`` takes it (empty for dolly's own columns)."""
        return ",".join(
            f"{item.name}={getattr(self, item.name)}" for item in fields(self) if getattr(self, item.name) != item.name
        )


def normalize_columns(text: str | None) -> str | None:
    """A ``--columns`` value checked and written out in full (``alpaca`` becomes its mapping); None for dolly's."""
    return Columns.parse(text).text() or None


DOLLY_COLUMNS = Columns()
