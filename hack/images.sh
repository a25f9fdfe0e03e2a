#!/usr/bin/env bash
# Build the two product images, modelcache-controller and modelcache-node,
# from Dockerfile.controller / Dockerfile.node with buildah (no Docker engine),
# and the DMCR image the e2e runs in place of registry:2 (Dockerfile.dmcr:
# Debian's docker-registry, since registry:2 cannot be pulled here), and write
# them as OCI archives:
#   build/images/modelcache-controller.oci.tar
#   build/images/modelcache-node.oci.tar
#   build/images/modelcache-dmcr.oci.tar
# Needs root and hack/install.d/images.sh's packages (buildah, mmdebstrap).
#
# Hermetic: the wheels are downloaded here on the host with `pip download` for
# the image's Python (CPython 3.11, manylinux x86_64) into the build context's
# wheels/, and the Dockerfiles install with --no-index. buildah runs in a
# network namespace of its own with no interfaces (`unshare --net`; its chroot
# isolation cannot take --network none), so a step that reached out would fail.
#
# Base: MODELCACHE_IMAGE_BASE picks the Dockerfiles' BASE build arg. Unset,
# the base is made here: `mmdebstrap --variant=minbase bookworm` plus Debian's
# python3 (3.11) and python3-pip, imported as localhost/modelcache-base:bookworm
# (stands in for the public python:3.11-slim-bookworm, which cannot be pulled
# here; the Dockerfiles default to that one).
#
# Cached by content under ~/.cache/modelcache-images/:
#   base-<recipe hash>.tar       the mmdebstrap root filesystem
#   wheels-<requirements hash>/  the wheel set
#   <inputs hash>/*.oci.tar      the images, keyed by the Dockerfiles, this
#                                script, the source files copied into the
#                                build, the wheel set, the base and the tag
# A rerun with nothing changed copies the cached archives (seconds).
# Buildah's own storage (vfs: works on any filesystem, inside containers too)
# is ~/.cache/modelcache-images/storage, apart from any system storage.
#
# MODELCACHE_IMAGE_TAG: the tag (default: the version in pyproject.toml);
# images are named localhost/modelcache-{controller,node}:<tag>.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cache="${HOME}/.cache/modelcache-images"
out="$root/build/images"
mkdir -p "$cache" "$out"
exec 9>"$cache/lock"
flock 9
rm -rf "$cache"/*.tmp "$cache"/*.tmp.tar  # what an interrupted run left

tag="${MODELCACHE_IMAGE_TAG:-$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}"
store=(--root "$cache/storage" --runroot "$cache/run" --storage-driver vfs)
images=(controller node dmcr)
start=$SECONDS

# --- the base --------------------------------------------------------------------
base="${MODELCACHE_IMAGE_BASE:-}"
base_id="$base"
if [ -z "$base" ]; then
  base=localhost/modelcache-base:bookworm
  mirror="${MODELCACHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  # what slim images leave out: docs, man pages, locales
  recipe=(--variant=minbase --include=python3,python3-pip,ca-certificates
          --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
          --dpkgopt='path-include=/usr/share/doc/*/copyright'
          --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*'
          bookworm)
  sources=("deb $mirror bookworm main" "deb $mirror bookworm-updates main"
           "deb ${mirror%/debian}/debian-security bookworm-security main")
  recipe_hash=$(printf '%s\n' "${recipe[@]}" "${sources[@]}" | sha256sum | cut -c1-16)
  tarball="$cache/base-$recipe_hash.tar"
  if [ ! -f "$tarball" ]; then
    echo "images: making the base (mmdebstrap bookworm minbase + python3)"
    mmdebstrap --quiet --format=tar "${recipe[@]}" "$tarball.tmp.tar" "${sources[@]}"
    mv "$tarball.tmp.tar" "$tarball"
  fi
  base_id="$recipe_hash"
  if [ "$(buildah "${store[@]}" inspect --type image --format '{{index .ImageAnnotations "org.modelcache.base.recipe"}}' "$base" 2>/dev/null)" != "$recipe_hash" ]; then
    echo "images: importing the base as $base"
    ctr=$(buildah "${store[@]}" from --quiet scratch)
    buildah "${store[@]}" add --quiet "$ctr" "$tarball" / >/dev/null
    buildah "${store[@]}" config \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
      --cmd python3 --annotation "org.modelcache.base.recipe=$recipe_hash" "$ctr"
    buildah "${store[@]}" commit --quiet --rm "$ctr" "$base" >/dev/null
  fi
fi

# --- the wheel set ------------------------------------------------------------------
# Every distribution the two installs need, read from pyproject.toml: the
# dependencies, both extras, the build backend (pip's isolated build of our own
# package installs it from the same wheels) and grpcio-tools (node build stage).
reqs=$(python3 - <<'EOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
tools = [r for r in p["project"]["optional-dependencies"]["dev"] if r.startswith("grpcio-tools")]
out = (p["project"]["dependencies"] + p["project"]["optional-dependencies"]["controller"]
       + p["project"]["optional-dependencies"]["node"] + p["build-system"]["requires"] + tools)
print("\n".join(sorted(set(out))))
EOF
)
wheels="$cache/wheels-$(printf '%s\n' "$reqs" | sha256sum | cut -c1-16)"
if [ ! -d "$wheels" ]; then
  echo "images: pip download (cp311, manylinux x86_64)"
  # bookworm's glibc is 2.36; this pip takes each platform tag literally, so list them all
  platforms=()
  for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
  printf '%s\n' "$reqs" >"$cache/requirements.txt"
  rm -rf "$wheels.tmp"
  python3 -m pip download --quiet --disable-pip-version-check --dest "$wheels.tmp" \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
    "${platforms[@]}" -r "$cache/requirements.txt"
  mv "$wheels.tmp" "$wheels"
fi

# --- the build context: what the Dockerfiles COPY, as git sees it ----------------------
# Tracked and untracked-but-not-ignored files only: csi/gen, __pycache__ and
# build output on this machine never reach the image.
ctx="$out/context"
rm -rf "$ctx"
mkdir -p "$ctx"
git ls-files -z --cached --others --exclude-standard -- \
    pyproject.toml README.md proto modelpack api kube ingest jobs controller cli csi \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | sort -z -u | xargs -0 cp --parents -t "$ctx"
cp -al "$wheels" "$ctx/wheels" 2>/dev/null || cp -a "$wheels" "$ctx/wheels"
# Dockerfile.dmcr's binary: Debian's docker-registry (distribution 2.8), the
# .deb fetched with apt-get download and unpacked here (no network in the build)
mkdir -p "$cache/debs"
deb=$(find "$cache/debs" -name 'docker-registry_*.deb' | sort | tail -n 1)
if [ -z "$deb" ]; then
  echo "images: apt-get download docker-registry"
  (cd "$cache/debs" && apt-get download -qq docker-registry >/dev/null)
  deb=$(find "$cache/debs" -name 'docker-registry_*.deb' | sort | tail -n 1)
fi
dpkg-deb -x "$deb" "$ctx/dmcr.tmp"
mkdir -p "$ctx/dmcr"
mv "$ctx/dmcr.tmp/usr/bin/docker-registry" "$ctx/dmcr/docker-registry"
rm -rf "$ctx/dmcr.tmp"

key=$( {
  echo "tag $tag" "base $base $base_id"
  sha256sum Dockerfile.controller Dockerfile.node Dockerfile.dmcr hack/images.sh
  (cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
} | sha256sum | cut -c1-16)
hit="$cache/$key"

# --- build (or reuse) ----------------------------------------------------------------
have=1
for name in "${images[@]}"; do [ -f "$hit/modelcache-$name.oci.tar" ] || have=0; done
if [ "$have" = 1 ]; then
  echo "images: cached ($key)"
else
  rm -rf "$hit.tmp"
  mkdir -p "$hit.tmp"
  for name in "${images[@]}"; do
    ref="localhost/modelcache-$name:$tag"
    echo "images: building $ref from Dockerfile.$name"
    unshare --net buildah "${store[@]}" build --quiet --isolation=chroot --pull=false \
      --build-arg "BASE=$base" --layers=false -f "$root/Dockerfile.$name" -t "$ref" "$ctx" >/dev/null
    buildah "${store[@]}" push --quiet "$ref" "oci-archive:$hit.tmp/modelcache-$name.oci.tar:$ref"
    buildah "${store[@]}" rmi "$ref" >/dev/null
  done
  # vfs keeps a full copy per layer: drop what the builds left, keep the base
  buildah "${store[@]}" rm --all >/dev/null
  buildah "${store[@]}" rmi --prune >/dev/null 2>&1 || true
  echo "$key" >"$hit.tmp/KEY"
  rm -rf "$hit"
  mv "$hit.tmp" "$hit"
  # keep the three newest image sets
  find "$cache" -mindepth 2 -maxdepth 2 -name KEY -printf '%T@ %h\n' | sort -rn | tail -n +4 \
    | cut -d' ' -f2- | xargs -r rm -rf
fi
for name in "${images[@]}"; do
  ln -f "$hit/modelcache-$name.oci.tar" "$out/modelcache-$name.oci.tar" 2>/dev/null \
    || cp "$hit/modelcache-$name.oci.tar" "$out/modelcache-$name.oci.tar"
done
echo "$key" >"$out/KEY"
rm -rf "$ctx"
echo "images: build/images/modelcache-{controller,node,dmcr}.oci.tar ($tag, key $key, $((SECONDS - start))s)"
