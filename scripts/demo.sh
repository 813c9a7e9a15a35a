#!/usr/bin/env bash
# Quick start, command 1: a zero-downtime replay of the bank example under live
# traffic. Installs what it needs into .venv; uses an embedded PostgreSQL unless
# ZDR_DATABASE_URL (or --database-url) names one. Arguments go to `zdr demo`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec zdr demo "$@"
