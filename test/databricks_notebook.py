"""train_dolly.py run cell by cell as Databricks runs it, with stand-ins for what only a workspace has, for tests.

- ``dbutils``: widgets (their values from ``DOLLY_TEST_WIDGETS``, JSON; the others keep the notebook's Databricks
  defaults) and ``library.restartPython``;
- ``spark``: a session whose SQL answers the current catalog and schema and runs ``CREATE VOLUME IF NOT EXISTS`` as
  Unity Catalog does, the volume appearing as a folder under ``DOLLY_VOLUMES_ROOT`` (the stand-in for /Volumes);
  ``DOLLY_TEST_NO_CREATE=1`` refuses it, as for a user without the privilege;
- no DBFS: the workspace has none (this machine has no /dbfs), as new accounts are provisioned.

The magic cells (``%pip``, ``%tensorboard``) are skipped; every other cell runs in one namespace, as in a notebook.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from helpers import notebook_cells


class Widgets:
    def __init__(self, values: dict[str, str]):
        self.values = values
        self.defaults: dict[str, str] = {}

    def text(self, name, default, label):
        self.defaults[name] = default

    def combobox(self, name, default, choices, label):
        self.defaults[name] = default

    def dropdown(self, name, default, choices, label):
        self.defaults[name] = default

    def get(self, name):
        return self.values.get(name, self.defaults[name])


class Dbutils:
    def __init__(self, values: dict[str, str]):
        self.widgets = Widgets(values)
        self.library = self

    def restartPython(self):  # noqa: N802 (dbutils' name)
        pass


class Row(tuple):
    pass


class Result:
    def __init__(self, row):
        self.row = row

    def first(self):
        return self.row


class Catalog:
    def tableExists(self, name):  # noqa: N802 (Spark's name)
        return False


class UnityCatalogSpark:
    """Just the SQL the notebook sends, answered as a Unity Catalog workspace would."""

    catalog = Catalog()

    def sql(self, query: str) -> Result:
        if "current_catalog()" in query:
            return Result(Row(("main", "default")))
        if query.startswith("CREATE VOLUME IF NOT EXISTS"):
            if os.environ.get("DOLLY_TEST_NO_CREATE") == "1":
                raise PermissionError("User does not have CREATE VOLUME on Schema 'main.default'")
            catalog, schema, volume = (part.strip("`") for part in query.split()[-1].split("."))
            Path(os.environ["DOLLY_VOLUMES_ROOT"], catalog, schema, volume).mkdir(parents=True, exist_ok=True)
            return Result(None)
        raise NotImplementedError(query)


if __name__ == "__main__":
    assert not os.path.exists("/dbfs"), "this stand-in is a workspace without DBFS"
    namespace = {
        "__name__": "__main__",
        "dbutils": Dbutils(json.loads(os.environ["DOLLY_TEST_WIDGETS"])),
        "spark": UnityCatalogSpark(),
    }
    for cell in notebook_cells():
        if not cell.startswith("# MAGIC"):
            exec(compile(cell, "train_dolly.py", "exec"), namespace)
