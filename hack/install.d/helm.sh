#!/usr/bin/env bash
# Build helm from Go modules through the module proxy, pinned below, cached
# outside the repo: ~/.cache/modelcache-tools/helm-<v>/helm. Rebuilt only when
# the binary is missing or `helm version` fails. tests/integration/test_chart.py
# finds it at the same path ($HELM overrides). Set GOFLAGS=-p=1 to keep a
# shared machine responsive.
set -euo pipefail
HELM_VERSION=v3.19.5
HELM_K8S_MINOR=34   # the k8s.io/client-go minor that helm version requires
tools="${HOME}/.cache/modelcache-tools"
dir="$tools/helm-$HELM_VERSION"
export CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"

if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    PATH="/usr/local/go/bin:$PATH"
  else
    echo "install: helm needs Go (not found); chart tests will be skipped" >&2
    exit 0
  fi
fi

if "$dir/helm" version --short >/dev/null 2>&1; then
  exit 0
fi
echo "install: helm $HELM_VERSION (go install)"
start=$SECONDS
mkdir -p "$dir"
k8s_ldflags=""
for pkg in pkg/lint/rules pkg/chartutil; do
  k8s_ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$HELM_K8S_MINOR"
done
log="$dir/build.log"
: >"$log"
# GOBIN makes `go install` write straight into the versioned directory; the
# ldflags stamp what helm's Makefile stamps: the version `helm version`
# prints, and the Kubernetes version `helm template`/`lint` assume (without
# it, v1.20, which fails charts with a kubeVersion constraint).
if ! GOBIN="$dir/bin.tmp" nice -n 19 go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION $k8s_ldflags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >>"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "install: failed: go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION (log: $log)" >&2
  exit 1
fi
mv "$dir/bin.tmp/helm" "$dir/helm"
rmdir "$dir/bin.tmp"
"$dir/helm" version --short >/dev/null
echo "install: helm $HELM_VERSION built in $((SECONDS - start))s"
