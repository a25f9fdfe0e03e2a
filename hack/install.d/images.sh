#!/usr/bin/env bash
# Install what hack/images.sh needs to build the product images without a
# Docker engine: buildah (builds the Dockerfiles, chroot isolation, vfs
# storage) and mmdebstrap (the local Debian bookworm base). The image test
# (tests/e2e/test_product_images.py) runs them with runc, which
# install.d/node-e2e.sh installs.
#
# Opt-in like node-e2e.sh: hack/install.sh runs every install.d script, and
# only the e2e (hack/e2e.sh sets MODELCACHE_NODE_E2E=1) or an explicit
# MODELCACHE_IMAGES=1 needs these.
set -euo pipefail
[ "${MODELCACHE_NODE_E2E:-0}" = 1 ] || [ "${MODELCACHE_IMAGES:-0}" = 1 ] || exit 0
export DEBIAN_FRONTEND=noninteractive
need=()
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v runc >/dev/null 2>&1 || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  echo "install: apt packages for the images: ${need[*]}"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi
