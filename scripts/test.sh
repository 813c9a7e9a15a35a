#!/usr/bin/env bash
# Quick start, command 2: the test suite, against a real PostgreSQL:
# ZDR_TEST_DATABASE_URL when set, else an embedded one. Arguments go to pytest.
# Two pytest-xdist workers (ZDR_TEST_WORKERS; 0 runs in this process), each with a
# database of its own, a test file at a time: the tests mostly wait on the database.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest -n "${ZDR_TEST_WORKERS:-2}" --dist loadfile "$@"
