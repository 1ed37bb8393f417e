"""The shape of the code: the README's layout table names every module where it is, the saved-model pipeline imports
nothing but its two siblings, and no code looks a command-line flag up in a list by position."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import PROJECT_ROOT

TRAINING = PROJECT_ROOT / "training"


def layout_table_paths() -> set[Path]:
    """Every path the README's layout table names. In a cell such as ```rank/lora.py`, `quantization.py``, the names
    after the first share its folder; folders are relative to ``training/`` unless they start at the project root."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    table = readme[readme.index("## Repository layout") :].split("\n## ", 1)[0]
    paths: set[Path] = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", row.split("|")[1])
        folder: Path | None = None
        for name in names:
            if "/" in name:
                path = PROJECT_ROOT / name if (PROJECT_ROOT / name.split("/")[0]).exists() else TRAINING / name
                folder = path.parent
            else:
                path = (folder or PROJECT_ROOT) / name
            paths.add(path)
    return paths


def test_the_readme_layout_table_matches_the_folders():
    named = layout_table_paths()
    missing = sorted(str(path.relative_to(PROJECT_ROOT)) for path in named if not path.exists())
    assert not missing, f"the layout table names paths that do not exist: {missing}"
    modules = {path for path in TRAINING.rglob("*.py") if path.name != "__init__.py"}
    unnamed = sorted(str(path.relative_to(PROJECT_ROOT)) for path in modules - named)
    assert not unnamed, f"modules the layout table does not name: {unnamed}"
    packages = {path.parent for path in TRAINING.rglob("__init__.py")} - {TRAINING}
    assert {package.name for package in packages} == {"driver", "rank", "saved_model"}


def test_the_saved_model_pipeline_imports_only_its_siblings():
    """instruct_pipeline.py is copied beside every model with consts.py and prompts.py: together they import nothing
    else from this project (checked on the files; the copy itself is tested where models are saved)."""
    folder = TRAINING / "saved_model"
    for name in ("instruct_pipeline.py", "consts.py", "prompts.py"):
        for node in ast.walk(ast.parse((folder / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in {"consts", "prompts"}, (name, ast.dump(node))
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(module.split(".")[0] in {"training", "bench"} for module in modules), (name, modules)


def test_no_flag_is_looked_up_in_a_list_by_index():
    """Flags are written from values where a process starts; nothing searches an argument list for one."""
    offenders = []
    for path in [*TRAINING.rglob("*.py"), PROJECT_ROOT / "train_dolly.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "index"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.startswith("-")
            ):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert not offenders, offenders
