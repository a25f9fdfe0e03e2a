#!/usr/bin/env bash
# The full-node end-to-end test (tests/e2e/): the whole system on one real
# node. etcd + kube-apiserver, kube-controller-manager, kube-scheduler, a real
# kubelet (built from Go modules), containerd and runc (Debian); our CRDs and
# RBAC manifests, the controller manager (admission webhook, gate lifter,
# Model adoption) and the NodeCache plugin (Kubernetes resolver, node labels)
# registered with kubelet; a Model and a Deployment that asks for it by
# annotation only, read byte-exact and read-only in its containers.
# Needs root. A plain `pytest` deselects it; hack/test.sh (the README's test
# command, and CI's) runs this script after pytest, so it runs once.
#
# On a fresh machine hack/install.sh builds what it needs: install.d/kube.sh
# (etcd, kube-apiserver, kubectl), then install.d/node-e2e.sh (kubelet,
# kube-scheduler, kube-controller-manager, ~2 min more on kube.sh's Go build
# cache; apt containerd, runc, busybox-static), which MODELCACHE_NODE_E2E=1
# turns on. Warm, the whole script takes well under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
export MODELCACHE_NODE_E2E=1
bash hack/install.sh
exec python3 -m pytest -q -p no:cacheprovider -m e2e tests/e2e "$@"
