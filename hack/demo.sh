#!/usr/bin/env bash
# The main job: install what is missing, then run the local demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install.sh --runtime
exec modelcache demo "$@"
