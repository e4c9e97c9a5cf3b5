#!/usr/bin/env bash
# Set everything up, then run the embedded default: a local Glance with a generated image,
# mounted through thunderfs and read through, printing where the bytes came from; ends with a
# summary: each step's time and sources, and what to try next.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
THUNDERFS_SETUP_SECONDS=$((SECONDS - start)) exec .venv/bin/python scripts/demo.py "$@"
