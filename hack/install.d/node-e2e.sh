#!/usr/bin/env bash
# Install what the full-node end-to-end test (tests/e2e, `hack/e2e.sh`) needs
# beyond the test API server that kube.sh builds:
#   ~/.cache/modelcache-tools/kube-<v>/{kubelet,kube-scheduler,kube-controller-manager,kube-proxy}
#   apt: containerd, runc, busybox-static (the test images' rootfs),
#        containernetworking-plugins, conntrack
# Each binary is rebuilt only when missing or `--version` fails.
# tests/e2e/nodeenv.py finds the binaries at the same paths.
#
# Opt-in: hack/install.sh runs every install.d script, and the first kubelet
# build takes many minutes on a 2-core machine, so this does nothing unless
# MODELCACHE_NODE_E2E=1 (hack/e2e.sh sets it).
#
# The Go commands come from the helper module kube.sh generates
# ($kube_dir/src/go.mod: k8s.io/kubernetes plus replace lines mapping its
# staging modules to their published versions). We copy that go.mod/go.sum to
# $kube_dir/src-node, add the three commands as tools and tidy there, so
# kube.sh's own module is never edited under it; all versions come from
# k8s.io/kubernetes's go.mod either way, so the shared Go build cache already
# holds every package the apiserver build compiled and only the rest compile.
#
# node-driver-registrar is NOT built here: its go.mod says
# `module github.com/kubernetes-csi/node-driver-registrar` (no /v2) while its
# tags are v2.x, so no tag is a valid module version, and the module proxy
# this project may use answers 403 for it (tags, commits and @latest alike).
# tests/e2e/fake_node_driver_registrar.py speaks the same kubelet plugin-registration
# protocol instead (see its docstring).
set -euo pipefail
[ "${MODELCACHE_NODE_E2E:-0}" = 1 ] || exit 0
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=../kube/versions.env
. "$here/kube/versions.env"
tools="${HOME}/.cache/modelcache-tools"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
# kubelet, scheduler and controller-manager all build without cgo (kubelet's
# cgo users — cadvisor's libpfm, etc. — sit behind build tags we don't set)
export CGO_ENABLED=0
export DEBIAN_FRONTEND=noninteractive

# --- apt packages --------------------------------------------------------------
# containerd and runc: the container runtime the real kubelet drives (CRI).
# busybox-static: one static binary with sh/cat/sha256sum/sleep, the whole
# rootfs of the test images (tests/e2e/images.py packs it, no Docker engine).
# containernetworking-plugins: the loopback plugin, so containerd's CRI
# network setup finds a config (pods run with hostNetwork, see nodeenv.py).
# conntrack: kubelet shells out to it on some paths; cheap to have.
need=()
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" \
  || need+=(busybox-static)
[ -x /usr/lib/cni/loopback ] || need+=(containernetworking-plugins)
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  echo "install: apt packages for the node e2e: ${need[*]}"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    PATH="/usr/local/go/bin:$PATH"
  else
    echo "install: kubelet needs Go (not found); the node e2e will fail" >&2
    exit 0
  fi
fi

# shellcheck source=../kube/lib.sh
. "$here/kube/lib.sh"   # quiet, kube_ldflags

# --- kubelet, kube-scheduler, kube-controller-manager -------------------------
kube_dir="$tools/kube-$KUBE_VERSION"
# kube-proxy: Services on the two-node e2e (tests/e2e/cluster2.py)
cmds=(kubelet kube-scheduler kube-controller-manager kube-proxy)
all_run() {
  local c
  for c in "${cmds[@]}"; do "$kube_dir/$c" --version >/dev/null 2>&1 || return 1; done
}
if ! all_run; then
  [ -f "$kube_dir/src/go.mod" ] || bash "$here/install.d/kube.sh"
  [ -f "$kube_dir/src/go.mod" ] \
    || { echo "install: $kube_dir/src/go.mod missing (kube.sh failed?)" >&2; exit 1; }
  echo "install: ${cmds[*]} $KUBE_VERSION (go build, many minutes the first time)"
  start=$SECONDS
  src="$kube_dir/src-node"
  log="$kube_dir/build-node.log"
  mkdir -p "$src"
  : >"$log"
  cp "$kube_dir/src/go.mod" "$kube_dir/src/go.sum" "$src/"
  for c in "${cmds[@]}"; do
    quiet "$log" go -C "$src" mod edit -tool="k8s.io/kubernetes/cmd/$c"
  done
  quiet "$log" go -C "$src" mod tidy
  ldflags=$(kube_ldflags)   # the same stamp as kube.sh's (kubelet reports it)
  for c in "${cmds[@]}"; do
    "$kube_dir/$c" --version >/dev/null 2>&1 && continue
    t=$SECONDS
    quiet "$log" nice -n 19 go -C "$src" build -trimpath -ldflags "$ldflags" \
      -o "$kube_dir/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$kube_dir/$c.tmp" "$kube_dir/$c"
    echo "install: $c built in $((SECONDS - t))s"
  done
  all_run
  echo "install: ${cmds[*]} $KUBE_VERSION built in $((SECONDS - start))s"
fi

# --- CoreDNS: cluster DNS for the chart e2e (tests/e2e/deployed.py) ----------------
# A host process serving cluster.local from the API server. Built from Go
# modules (github.com/coredns/coredns through the module proxy) as a small
# main package with only the plugins the e2e's Corefile uses (bind, errors,
# kubernetes): CoreDNS's own main links every plugin and its cloud SDKs.
COREDNS_VERSION=v1.15.0
coredns_dir="$tools/coredns-$COREDNS_VERSION"
if ! "$coredns_dir/coredns" -version >/dev/null 2>&1; then
  echo "install: coredns $COREDNS_VERSION (go build)"
  start=$SECONDS
  src="$coredns_dir/src"
  mkdir -p "$src"
  cat >"$src/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
)

func init() {
	dnsserver.Directives = []string{"bind", "errors", "kubernetes"}
}

func main() { coremain.Run() }
GO
  printf 'module modelcache.test/coredns\n\ngo 1.26.0\n\nrequire github.com/coredns/coredns %s\n' \
    "$COREDNS_VERSION" >"$src/go.mod"
  log="$coredns_dir/build.log"
  : >"$log"
  quiet "$log" go -C "$src" mod tidy
  quiet "$log" nice -n 19 go -C "$src" build -trimpath -ldflags "-s -w" -o "$coredns_dir/coredns.tmp" .
  mv "$coredns_dir/coredns.tmp" "$coredns_dir/coredns"
  "$coredns_dir/coredns" -version >/dev/null
  echo "install: coredns $COREDNS_VERSION built in $((SECONDS - start))s"
fi
