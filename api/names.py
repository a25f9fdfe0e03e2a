"""The workload delivery contract: every name the webhook, the gate lifter, the
SharedPVC materializer and the node plugin agree on.

One module so the pieces cannot drift apart: the controller, the node plugin
(``csi/``), the Job entry points (``jobs/``) and the CLI all import their
names from here.
"""

from __future__ import annotations

import hashlib

API_VERSION = "modelcache.io/v1alpha1"  # the CRDs' group and version

# -- on a Model / ClusterModel ------------------------------------------------------
FINALIZER = "modelcache.io/artifact"  # the artifact is deleted before the model goes
REIMPORT = "modelcache.io/reimport"  # a new value asks for a fresh publish of the same spec
UPSTREAM = "modelcache.io/upstream-revision"  # the schedule saw upstream move to this revision
# "sha256:<hex>": serve this generation of the Model (one of status.history) instead of
# the latest; removing it rolls forward. An annotation, not spec: a spec change is a publish
PIN = "modelcache.io/pin"
# ``modelcache import`` (air gap) pushed this digest itself: adopt it, run no Job
IMPORTED = "modelcache.io/imported-digest"
IMPORTED_REVISION = "modelcache.io/imported-revision"  # provenance: the source cluster's revision


def imported_tag(digest: str) -> str:
    """The registry tag ``modelcache import`` gives an imported manifest.

    One tag per digest, so every imported version stays listed and the
    finalizer (which deletes every tag of the repository) removes them all.
    """
    return f"imported-{digest.partition(':')[2][:12]}"


# -- on what the controller creates (Jobs, Secrets, PVCs) ----------------------------
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGER = "modelcache-controller"
LABEL_KIND = "modelcache.io/kind"
LABEL_NAME = "modelcache.io/name"
LABEL_NAMESPACE = "modelcache.io/namespace"
LABEL_UID = "modelcache.io/uid"
LABEL_KEY = "modelcache.io/publish-key"
ANN_TARGET = "modelcache.io/target"
# on a publish Job: which Secret (and keys) the manager lends it at run time, as JSON
# (controller/models/credentials.py); the Secret's values are never copied
ANN_SOURCE_CREDENTIAL = "modelcache.io/source-credential"
# on the dmcr Deployment's pod template: its certificate's SHA-256; a renewal changes it
# and the Deployment rolls (controller/dmcrtls.py: distribution reads it only at start)
ANN_TLS_FINGERPRINT = "modelcache.io/tls-fingerprint"
# on a Secret in the controller's namespace: an admin lends it to ClusterModels and
# ModelCatalogSources (value "true"); any other Secret there is refused
LABEL_SECRET_USABLE = "modelcache.io/usable-by-cluster-models"


# -- what a workload writes ---------------------------------------------------
# "qwen,team-a/embedder": Models of the workload's namespace, or ``<namespace>/<name>`` of a
# Model whose owner shares it with this namespace (spec.sharing, api/sharing.py)
ANN_MODELS = "modelcache.io/models"
ANN_CLUSTER_MODELS = "modelcache.io/cluster-models"  # "llama-3-8b": ClusterModels
ANN_DELIVERY = "modelcache.io/delivery"  # NodeCache | SharedPVC (else the model's, else default)

# -- what the webhook writes --------------------------------------------------
# on the pod template / pod: a fingerprint of what was injected, so a pod made
# from an injected template is not injected twice and a re-apply is idempotent
ANN_INJECTED = "modelcache.io/injected"
GATE = "modelcache.io/model-ready"  # the scheduling gate, lifted when every model is Ready
MODES = ("NodeCache", "SharedPVC")

MOUNT_ROOT = "/data/modelcache/models"  # each at MOUNT_ROOT/<name>; a shared one <ns>.<name>
ENV_DIR = "AI_MODELS_MODELS_DIR"
ENV_MODELS = "AI_MODELS_MODELS"  # JSON list of {name, path, digest, family, format}
VOLUME_PREFIX = "modelcache-"  # injected volume names: modelcache-<kind>-<name>, ≤ 63 chars

# -- NodeCache ------------------------------------------------------------------
CSI_DRIVER = "nodecache.modelcache.io"
# volumeAttributes of the inline volume
ATTR_MODEL = "model"
ATTR_CLUSTER_MODEL = "clusterModel"
# the owner namespace of a shared Model; absent = the pod's own (the node re-checks the grant)
ATTR_MODEL_NAMESPACE = "modelNamespace"
ATTR_DIGEST = "digest"
# a node that holds a model's tree carries this label (value "true"), so a
# preferred node affinity can lean toward it; the name part is
# "sha256-" + the first 40 hex digits of the manifest digest (≤ 63 chars)
NODE_LABEL_PREFIX = "nodecache.modelcache.io/"


def node_label(digest: str) -> str:
    """The node label that says "this node's cache holds ``digest``"."""
    algo, _, hexpart = digest.partition(":")
    return f"{NODE_LABEL_PREFIX}{algo}-{hexpart[:40]}"


# -- SharedPVC --------------------------------------------------------------------
# one RWX PVC per (namespace, digest), named after the digest; the model tree
# sits at the PVC's root directory PVC_SUBPATH(digest), written by the
# materializer Job into a staging dir and renamed into place, so a pod's
# subPath never shows a partial tree
PVC_PREFIX = "modelcache-"
ANN_PVC_DIGEST = "modelcache.io/digest"  # the digest a PVC is for
ANN_PVC_MATERIALIZED = "modelcache.io/materialized"  # set to the digest once the Job succeeded
LABEL_PVC = "modelcache.io/shared-pvc"  # "true" on every PVC and materializer Job we own
ANN_PVC_REFERENCE = "modelcache.io/reference"  # on the PVC: the registry reference, pinned


def pvc_name(digest: str) -> str:
    """``modelcache-<first 40 hex digits>`` (a DNS label)."""
    return PVC_PREFIX + digest.partition(":")[2][:40]


def pvc_subpath(digest: str) -> str:
    """The directory inside the PVC that holds the tree (manifest hex)."""
    return digest.partition(":")[2]


def materializer_job_name(namespace: str, digest: str) -> str:
    """Materializer Jobs run in the workload's namespace (the PVC's)."""
    h = hashlib.sha256(f"{namespace}/{digest}".encode()).hexdigest()[:10]
    return f"modelcache-materialize-{digest.partition(':')[2][:20]}-{h}"

# -- labels that let the controller find what it must act on ----------------------
# on a pod (and a pod template) that still carries GATE: the gate lifter watches
# only pods with this label; it sets the value to "false" once the gate is lifted
LABEL_GATED = "modelcache.io/gated"
# on a workload (top-level and its template) whose injected volumes use SharedPVC:
# the SharedPVC reconciler lists these to know which PVCs are in use
LABEL_USES_SHARED_PVC = "modelcache.io/uses-shared-pvc"


# -- what the controller keeps on the objects it manages ---------------------------
LABEL_CLAIM = "modelcache.io/pvc"  # on a materializer Job and a pull-secret copy: its PVC
ANN_FAILURES = "modelcache.io/materialize-failures"
ANN_FAILED_JOB = "modelcache.io/materialize-failed-job"  # the failed Job's uid, counted once
ANN_RETRY_AT = "modelcache.io/materialize-retry-at"
ANN_UNUSED_SINCE = "modelcache.io/unused-since"
ANN_URL = "modelcache.io/upload-url"  # on the token Secret: the session URL the reader sends to
ANN_SESSION = "modelcache.io/upload-session"
UPLOAD_TOKEN_KEY = "token"  # the key of the session token in the upload token Secret
