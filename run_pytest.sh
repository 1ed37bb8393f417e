#!/usr/bin/env bash
# Run the test suite: the fast tier by default, every test with --all (what CI runs). Other arguments go to pytest.
# The first run creates .venv and installs requirements_dev.txt (needs only Python 3.11).
set -euo pipefail
cd "$(dirname "$0")"
venv_python=$("${PYTHON:-python3}" -m training.driver.env_setup requirements_dev.txt | tail -n 1)
exec "$venv_python" -m pytest -c test/pytest.ini "$@"
