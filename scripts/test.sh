#!/usr/bin/env bash
# Quick start, command 2: the test suite, against a real PostgreSQL:
# ZDR_TEST_DATABASE_URL when set, else an embedded one. Arguments go to pytest.
# Two pytest-xdist workers (ZDR_TEST_WORKERS; 0 runs everything in one process), each
# with a database of its own, a test file at a time: the tests mostly wait on the
# database. Then, alone, the tests that run a real Prefect server with workers
# (`-m real_server`): their schedules and hand-overs are timed, and a busy machine
# would make them wait.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
workers="${ZDR_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
    exec python -m pytest "$@"
fi
# Exit 5 is "nothing selected" in one part: a file of the other part was given.
first=0
python -m pytest -n "$workers" --dist loadfile -m "not real_server" "$@" || first=$?
second=0
python -m pytest -m real_server "$@" || second=$?
[ "$first" = 5 ] && first=0
[ "$second" = 5 ] && second=0
[ "$first" != 0 ] && exit "$first"
exit "$second"
