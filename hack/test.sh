#!/usr/bin/env bash
# Run the whole test suite: install what is missing, lint, then pytest.
# Tests that mount filesystems need root (the CI machine and dev VMs are root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install.sh
echo "lint: ruff, mypy (strict on modelpack/), import-linter"
ruff check .
mypy modelpack
lint-imports --no-cache >/dev/null
exec python3 -m pytest -q -p no:cacheprovider "$@"
