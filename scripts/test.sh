#!/usr/bin/env bash
# Quick start, command 2: the test suite, against a real PostgreSQL:
# ZDR_TEST_DATABASE_URL when set, else an embedded one. Arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
