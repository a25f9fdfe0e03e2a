#!/usr/bin/env bash
# The main job, embedded: the whole system on this machine (see cli/demo.py).
# Installs what is missing (Debian packages, the Python distribution, and
# etcd + kube-apiserver + kubectl built from Go modules), then runs
# `modelcache demo`: etcd + kube-apiserver, the DMCR, a local Hugging Face hub,
# the upload gateway, the controller manager (its admission webhook registered
# with the API server) and the node plugin on loopback; a real model published
# as a Model, an annotated Deployment and Pod mutated by the webhook, the
# model mounted read-only as kubelet would (no kubelet runs). Needs root (the
# mount). Options: --once (tear down at the end; the default without a
# terminal) or --keep (leave it running until Ctrl-C; the default on one).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=kube/versions.env
. hack/kube/versions.env
if [ ! -x "${HOME}/.cache/modelcache-tools/kube-${KUBE_VERSION}/kube-apiserver" ] \
   || [ ! -x "${HOME}/.cache/modelcache-tools/etcd-${ETCD_VERSION}/etcd" ]; then
  echo "demo: first run: building etcd ${ETCD_VERSION}, kube-apiserver and kubectl ${KUBE_VERSION}"
  echo "demo: from Go modules (about 12 minutes on 2 cores; cached for later runs)"
fi
bash hack/install.sh --runtime
exec python3 -m cli.main demo "$@"
