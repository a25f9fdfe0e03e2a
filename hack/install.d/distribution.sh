#!/usr/bin/env bash
# Build distribution v3's registry (github.com/distribution/distribution/v3/cmd/registry)
# from the Go module proxy, cached outside the repo like the kube tools:
#   ~/.cache/modelcache-tools/distribution-<v>/registry
# The DMCR stays Debian's docker-registry (distribution 2.8). v3 is the second
# pull-through mirror that tests/integration/test_mirrors.py and bench/fanout run:
# on a miss it streams the blob to the client and into its store from one upstream
# fetch, where 2.8 fetches it twice (cli/local/registry.py: distribution_v3).
# Pinned in hack/kube/versions.env; rebuilt only when `registry --version` fails.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=../kube/versions.env
. "$here/kube/versions.env"   # DISTRIBUTION_VERSION
# shellcheck source=../kube/lib.sh
. "$here/kube/lib.sh"   # go_env, go_install_into
go_env "distribution v3" "the mirror tests will fail" || exit 0

dir="${HOME}/.cache/modelcache-tools/distribution-$DISTRIBUTION_VERSION"
if ! "$dir/registry" --version >/dev/null 2>&1; then
  echo "install: distribution $DISTRIBUTION_VERSION (go build)"
  start=$SECONDS
  go_install_into "$dir" registry \
    "github.com/distribution/distribution/v3/cmd/registry@$DISTRIBUTION_VERSION" "-s -w"
  "$dir/registry" --version >/dev/null
  echo "install: distribution $DISTRIBUTION_VERSION built in $((SECONDS - start))s"
fi
