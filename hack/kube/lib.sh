# Shared by hack/install.d/kube.sh and node-e2e.sh (sourced, not run).

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
