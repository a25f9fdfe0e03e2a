# Shared by the scripts of hack/install.d (sourced, not run).

# Run a command with its output appended to a log; on failure show the log's
# tail (go's "downloading ..." chatter stays out of sight when all is well).
quiet() {
  local log=$1; shift
  "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "install: failed: $* (log: $log)" >&2; return 1; }
}

# The -ldflags of a k8s.io/kubernetes command at $KUBE_VERSION: what kubernetes'
# hack/lib/version.sh stamps, so --version, kubectl's skew check and kubelet's
# reported kubeletVersion see the real version instead of v0.0.0-master.
kube_ldflags() {
  local minor=${KUBE_VERSION#v1.} flags="-s -w" pkg
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  printf '%s' "$flags"
}

# Go for the builds of hack/install.d: the environment they share, and go found on
# PATH or in /usr/local/go. Without Go it says what will fail ($1 needs it, $2) and
# returns 1: the caller exits 0, and the tests that need the tool fail by name.
go_env() {
  export CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
  export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
  command -v go >/dev/null 2>&1 && return 0
  if [ -x /usr/local/go/bin/go ]; then PATH="/usr/local/go/bin:$PATH"; return 0; fi
  echo "install: $1 needs Go (not found); $2" >&2
  return 1
}

# `go install PKG@VERSION` as DIR/NAME, run outside any module so that the tool's
# own go.mod decides its dependencies (needs a go.mod without replace lines);
# the build's output goes to DIR/build.log.
go_install_into() {
  local dir=$1 name=$2 pkg=$3 ldflags=$4 log
  mkdir -p "$dir/bin"
  log="$dir/build.log"
  : >"$log"
  (cd "$dir" && quiet "$log" env GOBIN="$dir/bin" nice -n 19 go install -trimpath \
    -ldflags "$ldflags" "$pkg")
  mv "$dir/bin/$name" "$dir/$name"
  rmdir "$dir/bin" 2>/dev/null || true
}
