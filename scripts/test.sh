#!/usr/bin/env bash
# The test command: every test, real FUSE mounts and a real Glance, nothing skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -p no:cacheprovider -rfE "$@"
