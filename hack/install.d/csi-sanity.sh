#!/usr/bin/env bash
# Build csi-sanity (the CSI conformance suite) from its Go module, pinned,
# cached outside the repo: ~/.cache/modelcache-tools/csi-sanity-<tag>/csi-sanity.
# Skips when the binary is already there. tests/integration/test_csi_sanity.py
# finds it at the same path (or $CSI_SANITY).
set -euo pipefail
TAG="${CSI_SANITY_TAG:-v5.6.0}"
dir="${HOME}/.cache/modelcache-tools/csi-sanity-${TAG}"
if [ -x "$dir/csi-sanity" ]; then
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "install: csi-sanity needs Go (not found); CSI conformance tests will fail" >&2
  exit 0
fi
echo "install: csi-sanity ${TAG}"
mkdir -p "$dir"
GOBIN="$dir" GOFLAGS=-buildvcs=false go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@${TAG}"
