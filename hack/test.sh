#!/usr/bin/env bash
# Run the whole test suite: install what is missing, lint, pytest, then the node e2e.
# Tests that mount filesystems need root (the CI machine and dev VMs are root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install.sh
echo "lint: ruff, mypy (strict on modelpack/, every package), import-linter"
ruff check .
mypy modelpack api kube ingest jobs controller csi cli
lint-imports --no-cache >/dev/null
python3 -m pytest -q -p no:cacheprovider "$@"
# the full-node end-to-end (a real kubelet, containerd, the whole system on one
# node; pytest above deselects it) runs with the whole suite, not with a selection
if [ "$#" -eq 0 ]; then
  bash hack/e2e.sh
fi
