#!/usr/bin/env bash
# versitygw: a real S3-compatible gateway serving a POSIX directory; the S3
# source's integration tests run against it on loopback. Built from the Go
# module proxy and cached by version outside the repo.
set -euo pipefail
VERSION="${VERSITYGW_VERSION:-v1.8.0}"
dest="${HOME}/.cache/modelcache-tools/versitygw-${VERSION}"
if [ -x "$dest/bin/versitygw" ]; then
  exit 0
fi
command -v go >/dev/null || { echo "install: go is needed to build versitygw" >&2; exit 1; }
echo "install: versitygw ${VERSION} (go install, a few minutes the first time)"
mkdir -p "$dest"
GOBIN="$dest/bin.tmp" CGO_ENABLED=0 go install "github.com/versity/versitygw/cmd/versitygw@${VERSION}"
mv "$dest/bin.tmp" "$dest/bin"
