#!/usr/bin/env bash
# Build kwok (sigs.k8s.io/kwok), which simulates nodes and pods against a real
# API server for bench/scale and tests/integration/test_scale_small.py, from the
# Go module proxy, cached outside the repo like the kube tools:
#   ~/.cache/modelcache-tools/kwok-<v>/kwok
#   ~/.cache/modelcache-tools/kwok-<v>/node-stages.yaml
# kwok does nothing without Stage configs (`--config`); node-stages.yaml is the
# module's own node-initialize + node-heartbeat-with-lease stages, from the
# same version's module source.
# pinned in hack/kube/versions.env; rebuilt only when the binary is missing or
# `--version` fails. kwok's go.mod has no replace lines, so a plain
# `go install module@version` builds it.
# Set GOFLAGS=-p=1 to keep a shared machine responsive.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=../kube/versions.env
. "$here/kube/versions.env"   # KWOK_VERSION
tools="${HOME}/.cache/modelcache-tools"
# shellcheck source=../kube/lib.sh
. "$here/kube/lib.sh"   # go_env, go_install_into
go_env kwok "the scale tests will fail" || exit 0

dir="$tools/kwok-$KWOK_VERSION"
if ! { "$dir/kwok" --version >/dev/null 2>&1 && [ -s "$dir/node-stages.yaml" ]; }; then
  echo "install: kwok $KWOK_VERSION (go build)"
  start=$SECONDS
  go_install_into "$dir" kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
    "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
  stages="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage/node"
  { cat "$stages/fast/node-initialize.yaml"; echo "---"
    cat "$stages/heartbeat-with-lease/node-heartbeat-with-lease.yaml"; } >"$dir/node-stages.yaml.tmp"
  mv "$dir/node-stages.yaml.tmp" "$dir/node-stages.yaml"
  "$dir/kwok" --version >/dev/null
  echo "install: kwok $KWOK_VERSION built in $((SECONDS - start))s"
fi
