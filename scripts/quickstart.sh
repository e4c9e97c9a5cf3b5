#!/usr/bin/env bash
# Set everything up, then run the embedded default: a local Glance with a generated image,
# mounted through thunderfs and read through, printing where the bytes came from.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
