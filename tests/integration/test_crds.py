"""The CRDs in crds/ against the real kube-apiserver: what the API server itself rejects.

Every invalid object below is refused by the API server (OpenAPI schema or a
CEL rule in the CRD), with the message users will see asserted, before any
controller runs. Objects are created with strict field validation, as
``kubectl apply`` does by default. Also: the immutable fields on update,
defaults, valid edge cases accepted, status validation, and the printer
columns of the real ``kubectl get``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests import kubeenv

kube = kubeenv.kube

CRD_DIR = os.path.join(kubeenv.REPO_ROOT, "crds")
GROUP, VERSION = "modelcache.io", "v1alpha1"
PLURALS = {"Model": "models", "ClusterModel": "clustermodels",
           "ModelCatalogSource": "modelcatalogsources"}
HEX = "0123456789abcdef" * 4


def load_crds() -> dict[str, dict[str, Any]]:
    out = {}
    for name in sorted(os.listdir(CRD_DIR)):
        if name.endswith(".yaml"):
            with open(os.path.join(CRD_DIR, name)) as f:
                doc = yaml.safe_load(f)
            out[doc["spec"]["names"]["kind"]] = doc
    return out


def wait_established(kube: kubeenv.KubeEnv, names: list[str], timeout: float = 30) -> None:
    ext = client.ApiextensionsV1Api(kube.api_client())
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            crd = ext.read_custom_resource_definition(name)
            if any(c.type == "Established" and c.status == "True"
                   for c in (crd.status and crd.status.conditions) or []):
                pending.discard(name)
        time.sleep(0.1)
    assert not pending, f"CRDs not Established: {pending}"


def install_crds(kube: kubeenv.KubeEnv) -> None:
    """``kubectl apply -f crds/`` (idempotent: other modules may have installed them)."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", CRD_DIR)
    wait_established(kube, [c["metadata"]["name"] for c in load_crds().values()])


@pytest.fixture(scope="module")
def crds(kube: kubeenv.KubeEnv) -> client.CustomObjectsApi:
    install_crds(kube)
    return client.CustomObjectsApi(kube.api_client())


@pytest.fixture(scope="module")
def ns(kube: kubeenv.KubeEnv, crds: client.CustomObjectsApi) -> str:
    name = f"crds-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube.api_client()).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


def obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind,
            "metadata": {"name": name}, "spec": spec}


def create(api: client.CustomObjectsApi, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    plural = PLURALS[body["kind"]]
    if body["kind"] == "Model":
        answer = api.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body,
                                                     field_validation="Strict")
    else:
        answer = api.create_cluster_custom_object(GROUP, VERSION, plural, body,
                                                  field_validation="Strict")
    assert isinstance(answer, dict)
    return answer


def message_of(err: ApiException) -> str:
    """The API server's human message (the body is JSON, with its quotes escaped)."""
    try:
        return str(json.loads(err.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(err.body)


def hf(**extra: Any) -> dict[str, Any]:
    return {"source": {"huggingFace": {"repo": "Qwen/Qwen2.5-0.5B-Instruct", **extra}}}


def with_(spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**copy.deepcopy(spec), **extra}


# (id, kind, spec, expected message fragment). Each is one mistake a user
# could make; the fragment is the part of the API server's answer that says
# what is wrong.
INVALID: list[tuple[str, str, dict[str, Any], str]] = [
    ("no-source", "Model", {"format": "Auto"}, "spec.source: Required value"),
    ("empty-source", "Model", {"source": {}},
     "exactly one of huggingFace, ollama, http, s3, pvc, upload must be set"),
    ("two-sources", "Model", {"source": {"upload": {}, "ollama": {"model": "library/llama3.2"}}},
     "exactly one of huggingFace, ollama, http, s3, pvc, upload must be set"),
    ("hf-repo-no-org", "Model", {"source": {"huggingFace": {"repo": "gpt2"}}},
     "repo must be 'org/name'"),
    ("hf-repo-dotdot", "Model", {"source": {"huggingFace": {"repo": "org/..x"}}},
     "repo must be 'org/name'"),
    ("hf-repo-too-long", "Model", {"source": {"huggingFace": {"repo": "o/" + "x" * 199}}},
     "spec.source.huggingFace.repo: Too long: may not be more than 200 bytes"),
    ("hf-revision-dotdot", "Model", hf(revision="main/../x"),
     "revision must be a branch, tag or commit"),
    ("hf-revision-space", "Model", hf(revision="my branch"),
     "revision must be a branch, tag or commit"),
    ("hf-include-parent", "Model", hf(include=["../secrets/*"]),
     "patterns are relative to the repository root"),
    ("hf-include-absolute", "Model", hf(exclude=["/etc/*"]),
     "patterns are relative to the repository root"),
    ("hf-include-too-many", "Model", hf(include=[f"*.{i}" for i in range(65)]),
     "spec.source.huggingFace.include: Too many: 65: must have at most 64 items"),
    ("secret-namespace", "Model", hf(authSecretRef={"name": "hf", "namespace": "kube-system"}),
     "authSecretRef may not set a namespace: a Model reads Secrets in its own namespace only"),
    ("secret-name", "Model", hf(authSecretRef={"name": "HF_Token"}),
     "name must be a Secret name (a DNS subdomain)"),
    ("secret-key", "Model", hf(authSecretRef={"name": "hf", "key": "a/b"}),
     "key must be a Secret data key"),
    ("ollama-model-upper", "Model", {"source": {"ollama": {"model": "Library/Llama"}}},
     "model must be 'namespace/model' or 'model'"),
    ("ollama-tag", "Model", {"source": {"ollama": {"model": "llama3.2", "tag": ":1b"}}},
     "tag must be an Ollama tag"),
    ("ollama-registry-scheme", "Model",
     {"source": {"ollama": {"model": "llama3.2", "registry": "https://registry.ollama.ai"}}},
     "registry must be host or host:port, without a scheme or path"),
    ("http-not-url", "Model", {"source": {"http": {"url": "ftp://example.com/m.gguf"}}},
     "url must be an absolute https:// (or http://) URL"),
    ("http-relative", "Model", {"source": {"http": {"url": "/m.gguf"}}},
     "url must be an absolute https:// (or http://) URL"),
    ("http-plain-unpinned", "Model", {"source": {"http": {"url": "http://example.com/m.gguf"}}},
     "a plain http:// url needs sha256 and no authSecretRef"),
    ("http-plain-with-token", "Model", {"source": {"http": {
        "url": "http://example.com/m.gguf", "sha256": HEX, "authSecretRef": {"name": "t"}}}},
     "a plain http:// url needs sha256 and no authSecretRef"),
    ("http-sha256-short", "Model", {"source": {"http": {
        "url": "https://example.com/m.gguf", "sha256": "abc123"}}},
     "sha256 must be 64 lowercase hex digits"),
    ("http-sha256-upper", "Model", {"source": {"http": {
        "url": "https://example.com/m.gguf", "sha256": HEX.upper()}}},
     "sha256 must be 64 lowercase hex digits"),
    ("http-archive", "Model", {"source": {"http": {
        "url": "https://example.com/m.tar", "archive": "Rar"}}},
     'spec.source.http.archive: Unsupported value: "Rar": supported values: "Auto", "None", "Tar", "Zip"'),
    ("s3-bucket-upper", "Model", {"source": {"s3": {"bucket": "My_Models"}}},
     "bucket must be an S3 bucket name"),
    ("s3-bucket-ip", "Model", {"source": {"s3": {"bucket": "192.168.1.10"}}},
     "bucket must be an S3 bucket name"),
    ("s3-bucket-short", "Model", {"source": {"s3": {"bucket": "ab"}}},
     "spec.source.s3.bucket: Invalid value: \"ab\": spec.source.s3.bucket in body should be at least 3 chars long"),
    ("s3-endpoint-plain", "Model", {"source": {"s3": {
        "bucket": "models", "endpoint": "http://minio.example.com:9000"}}},
     "endpoint must be an https:// URL (http:// only for a loopback host)"),
    ("s3-prefix-parent", "Model", {"source": {"s3": {"bucket": "models", "prefix": "a/../b"}}},
     "prefix must not start with '/' or contain a '..' segment"),
    ("pvc-path-absolute", "Model", {"source": {"pvc": {"claimName": "w", "path": "/etc"}}},
     "path must be relative to the volume root"),
    ("pvc-claim-name", "Model", {"source": {"pvc": {"claimName": "My Weights"}}},
     "claimName must be a PersistentVolumeClaim name"),
    ("format-enum", "Model", with_(hf(), format="ONNX"),
     'spec.format: Unsupported value: "ONNX": supported values: "Auto", "Safetensors", "GGUF", "Diffusers"'),
    ("format-raw-spelled-Raw", "Model", with_(hf(), format="raw"),
     'spec.format: Unsupported value: "raw": supported values: "Auto", "Safetensors", "GGUF", "Diffusers", "Raw"'),
    ("delivery-mode-enum", "Model", with_(hf(), delivery={"mode": "HostPath"}),
     'spec.delivery.mode: Unsupported value: "HostPath"'),
    ("sharedpvc-without-mode", "Model",
     with_(hf(), delivery={"sharedPVC": {"storageClassName": "nfs-rwx"}}),
     "delivery.sharedPVC may be set only with delivery.mode SharedPVC"),
    ("nodecache-with-sharedpvc-mode", "Model",
     with_(hf(), delivery={"mode": "SharedPVC", "nodeCache": {"pin": True}}),
     "delivery.nodeCache may be set only with delivery.mode NodeCache"),
    ("schedule-unit", "Model", with_(hf(), updatePolicy={"schedule": "@every 1 day"}),
     "schedule must be '@every <duration>'"),
    ("schedule-cron-fields", "Model", with_(hf(), updatePolicy={"schedule": "0 3 * *"}),
     "schedule must be '@every <duration>'"),
    ("schedule-upload", "Model",
     {"source": {"upload": {}}, "updatePolicy": {"schedule": "@daily"}},
     "updatePolicy does not apply to an upload source"),
    ("toleration-operator", "Model",
     with_(hf(), publish={"tolerations": [{"key": "gpu", "operator": "In"}]}),
     'spec.publish.tolerations[0].operator: Unsupported value: "In"'),
    ("resources-quantity", "Model",
     with_(hf(), publish={"resources": {"limits": {"memory": "lots"}}}),
     "spec.publish.resources.limits.memory: Invalid value: \"lots\""),
    ("node-selector-size", "Model", with_(hf(), publish={
        "nodeSelector": {f"k{i}": "v" for i in range(33)}}),
     "spec.publish.nodeSelector: Too many: 33: must have at most 32 items"),
    ("unknown-field", "Model", with_(hf(), replicas=3),
     'unknown field "spec.replicas"'),
    # ClusterModel
    ("cluster-pvc", "ClusterModel", {"source": {"pvc": {"claimName": "w"}}},
     'unknown field "spec.source.pvc"'),
    ("cluster-two-sources", "ClusterModel", {"source": {
        "catalog": {"sourceRef": "upstream", "model": "llama"}, "upload": {}}},
     "exactly one of huggingFace, ollama, http, s3, upload, catalog must be set"),
    ("cluster-secret-namespace", "ClusterModel",
     hf(authSecretRef={"name": "hf", "namespace": "team-a"}),
     "authSecretRef may not set a namespace: a ClusterModel reads Secrets in the controller's namespace only"),
    ("cluster-catalog-model", "ClusterModel",
     {"source": {"catalog": {"sourceRef": "upstream", "model": "Llama 3"}}},
     "model must be a remote ClusterModel name"),
    ("cluster-catalog-missing-model", "ClusterModel",
     {"source": {"catalog": {"sourceRef": "upstream"}}},
     "spec.source.catalog.model: Required value"),
    ("model-catalog", "Model", {"source": {"catalog": {"sourceRef": "upstream", "model": "x"}}},
     'unknown field "spec.source.catalog"'),
    # ModelCatalogSource
    ("mcs-no-url", "ModelCatalogSource", {"refreshInterval": "1h"}, "spec.url: Required value"),
    ("mcs-plain-http", "ModelCatalogSource", {"url": "http://catalog.example.com"},
     "url must be an https:// URL (http:// only for a loopback host)"),
    ("mcs-ca-not-base64", "ModelCatalogSource",
     {"url": "https://catalog.example.com", "caBundle": "-----BEGIN CERTIFICATE-----"},
     "spec.caBundle in body must be of type byte"),
    ("mcs-ca-too-big", "ModelCatalogSource",
     {"url": "https://catalog.example.com", "caBundle": "QUFB" * 16385},
     "spec.caBundle: Too long: may not be more than 65536 bytes"),
    ("mcs-refresh-too-often", "ModelCatalogSource",
     {"url": "https://catalog.example.com", "refreshInterval": "10s"},
     "refreshInterval must be a duration of at least 1m"),
    ("mcs-refresh-not-duration", "ModelCatalogSource",
     {"url": "https://catalog.example.com", "refreshInterval": "daily"},
     "refreshInterval must be a duration of at least 1m"),
    ("mcs-token-namespace", "ModelCatalogSource",
     {"url": "https://catalog.example.com",
      "tokenSecretRef": {"name": "catalog-token", "namespace": "default"}},
     "tokenSecretRef may not set a namespace"),
]


@pytest.mark.parametrize(("kind", "spec", "message"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_rejected_by_api_server(crds: client.CustomObjectsApi, ns: str, kind: str,
                                       spec: dict[str, Any], message: str) -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ApiException) as err:
        create(crds, ns, obj(kind, name, spec))
    # 422 for schema/CEL, 400 for strict decoding (unknown fields)
    assert err.value.status in (400, 422), err.value.body
    assert message in message_of(err.value), err.value.body


def test_name_longer_than_63_rejected(crds: client.CustomObjectsApi, ns: str) -> None:
    with pytest.raises(ApiException) as err:
        create(crds, ns, obj("Model", "m" * 64, hf()))
    assert err.value.status == 422
    assert "metadata.name must be at most 63 characters" in message_of(err.value)


VALID: list[tuple[str, str, dict[str, Any]]] = [
    ("hf-commit", "Model", hf(revision="7ae557604adf67be50417f59c2c2f167def9a775",
                              include=["*.safetensors", "*.json"], exclude=["original/*"],
                              authSecretRef={"name": "hf-token", "key": "token"})),
    ("hf-pr-ref", "Model", hf(revision="refs/pr/1")),
    ("ollama-short", "Model", {"source": {"ollama": {"model": "llama3.2", "tag": "1b"}}}),
    ("ollama-loopback", "Model", {"source": {"ollama": {
        "model": "library/qwen2.5", "tag": "0.5b-instruct-q4_K_M", "registry": "127.0.0.1:11434"}}}),
    ("http-https", "Model", {"source": {"http": {"url": "https://example.com/m.tar?x=1",
                                                 "archive": "Tar"}}}),
    ("http-plain-pinned", "Model", {"source": {"http": {"url": "http://mirror.internal/m.gguf",
                                                        "sha256": HEX}}}),
    ("http-loopback", "Model", {"source": {"http": {"url": "http://127.0.0.1:8080/m.gguf",
                                                    "authSecretRef": {"name": "t"}}}}),
    ("s3-aws", "Model", {"source": {"s3": {"bucket": "my.models-1", "region": "eu-west-1",
                                           "prefix": "llama/3/", "authSecretRef": {"name": "s3"}}}}),
    ("s3-loopback", "Model", {"source": {"s3": {"bucket": "models",
                                                "endpoint": "http://localhost:9000"}}}),
    ("pvc", "Model", {"source": {"pvc": {"claimName": "weights", "path": "llama/"}}}),
    ("upload", "Model", {"source": {"upload": {}}, "format": "GGUF"}),
    ("everything", "Model", with_(
        hf(), format="Safetensors",
        delivery={"mode": "NodeCache", "nodeCache": {"pin": True, "prefetch": {
            "nodeSelector": {"gpu": "h100"}}}},
        updatePolicy={"schedule": "0 3 * * 1-5"},
        publish={"resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                               "limits": {"memory": 4294967296}},
                 "nodeSelector": {"kubernetes.io/os": "linux"},
                 "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]})),
    ("shared-pvc", "Model", with_(hf(), delivery={"mode": "SharedPVC",
                                                  "sharedPVC": {"storageClassName": "nfs-rwx"}})),
    ("cluster-catalog", "ClusterModel", {
        "source": {"catalog": {"sourceRef": "upstream", "model": "llama-3-8b"}},
        "updatePolicy": {"schedule": "@every 1h30m"}}),
    ("cluster-hf", "ClusterModel", hf(authSecretRef={"name": "hf-token"})),
    ("mcs", "ModelCatalogSource", {"url": "https://catalog.example.com/v1",
                                   "caBundle": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==",
                                   "tokenSecretRef": {"name": "catalog-token", "key": "token"},
                                   "refreshInterval": "15m"}),
    ("mcs-loopback", "ModelCatalogSource", {"url": "http://127.0.0.1:8443"}),
]


@pytest.mark.parametrize(("kind", "spec"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_accepted(crds: client.CustomObjectsApi, ns: str, kind: str,
                        spec: dict[str, Any]) -> None:
    name = f"ok-{uuid.uuid4().hex[:8]}"
    created = create(crds, ns, obj(kind, name, spec))
    assert _contains(created["spec"], spec), created["spec"]


def _contains(got: Any, want: Any) -> bool:
    """``want`` is kept in ``got`` (which may add defaults): nothing was pruned."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _contains(got[k], v)
                                             for k, v in want.items())
    return bool(got == want)


def test_defaults(crds: client.CustomObjectsApi, ns: str) -> None:
    m = create(crds, ns, obj("Model", "defaults", {"source": {"huggingFace": {"repo": "a/b"}}}))
    assert m["spec"]["format"] == "Auto"
    assert m["spec"]["source"]["huggingFace"]["revision"] == "main"
    o = create(crds, ns, obj("Model", "defaults-ollama", {"source": {"ollama": {"model": "x"}}}))
    assert o["spec"]["source"]["ollama"] == {"model": "x", "tag": "latest",
                                             "registry": "registry.ollama.ai"}
    h = create(crds, ns, obj("Model", "defaults-http",
                             {"source": {"http": {"url": "https://e.com/m"}}}))
    assert h["spec"]["source"]["http"]["archive"] == "Auto"
    s = create(crds, ns, obj("ModelCatalogSource", f"defaults-{ns}", {"url": "https://c.example"}))
    assert s["spec"]["refreshInterval"] == "1h"


# --- immutability -------------------------------------------------------------

Patch = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Patch:
    def apply(spec: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        cur = spec
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[leaf] = value
    return apply


def _replace_source(spec: dict[str, Any]) -> None:
    spec["source"] = {"ollama": {"model": "library/llama3.2"}}


IMMUTABLE = [
    ("repo", _set("source.huggingFace.repo", "Qwen/Other"), "spec.source is immutable"),
    ("revision", _set("source.huggingFace.revision", "v2"), "spec.source is immutable"),
    ("include", _set("source.huggingFace.include", ["*.gguf"]), "spec.source is immutable"),
    ("secret", _set("source.huggingFace.authSecretRef", {"name": "other"}),
     "spec.source is immutable"),
    ("kind", _replace_source, "spec.source is immutable"),
    ("format", _set("format", "GGUF"), "spec.format is immutable"),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in IMMUTABLE],
                         ids=[c[0] for c in IMMUTABLE])
def test_immutable_on_update(crds: client.CustomObjectsApi, ns: str, change: Patch,
                             message: str) -> None:
    name = f"imm-{uuid.uuid4().hex[:8]}"
    created = create(crds, ns, obj("Model", name, hf(authSecretRef={"name": "hf"})))
    body = copy.deepcopy(created)
    change(body["spec"])
    with pytest.raises(ApiException) as err:
        crds.replace_namespaced_custom_object(GROUP, VERSION, ns, "models", name, body)
    assert err.value.status == 422
    assert message in message_of(err.value), err.value.body


def test_mutable_fields_update(crds: client.CustomObjectsApi, ns: str) -> None:
    """Delivery, schedule and publish placement are not the model's identity: they change."""
    name = f"mut-{uuid.uuid4().hex[:8]}"
    created = create(crds, ns, obj("Model", name, hf()))
    body = copy.deepcopy(created)
    body["spec"]["delivery"] = {"mode": "SharedPVC", "sharedPVC": {"storageClassName": "nfs"}}
    body["spec"]["updatePolicy"] = {"schedule": "@every 24h"}
    body["spec"]["publish"] = {"nodeSelector": {"pool": "cpu"}}
    updated = crds.replace_namespaced_custom_object(GROUP, VERSION, ns, "models", name, body)
    assert isinstance(updated, dict)
    assert updated["metadata"]["generation"] == 2
    assert updated["spec"]["delivery"]["mode"] == "SharedPVC"


def test_cluster_model_source_immutable(crds: client.CustomObjectsApi) -> None:
    name = f"imm-{uuid.uuid4().hex[:8]}"
    created = create(crds, "", obj("ClusterModel", name, {
        "source": {"catalog": {"sourceRef": "upstream", "model": "a"}}}))
    created["spec"]["source"]["catalog"]["model"] = "b"
    with pytest.raises(ApiException) as err:
        crds.replace_cluster_custom_object(GROUP, VERSION, "clustermodels", name, created)
    assert "spec.source is immutable: create a new ClusterModel" in message_of(err.value)


# --- status --------------------------------------------------------------------


READY_STATUS: dict[str, Any] = {
    "phase": "Ready", "observedGeneration": 1,
    "conditions": [{"type": "Ready", "status": "True", "reason": "Published",
                    "message": "the model is ready to use",
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}],
    "progress": {"bytesDone": 988097824, "bytesTotal": 988097824, "percent": 100,
                 "bytesPerSecond": 0, "etaSeconds": 0},
    "source": {"resolvedRevision": "7ae557604adf67be50417f59c2c2f167def9a775"},
    "artifact": {"digest": f"sha256:{HEX}", "sizeBytes": 988097824,
                 "reference": "dmcr.modelcache-system.svc:5000/models/ns/qwen@sha256:" + HEX},
    "resolved": {"format": "Safetensors", "family": "qwen2",
                 "architecture": "Qwen2ForCausalLM", "parameterCount": 494032768,
                 "paramSize": "494M", "precision": "bf16", "contextLength": 32768,
                 "tensors": 290, "files": 9},
    "publish": {"key": "abc123", "jobName": "mc-ns-qwen-abc123"},
}


def test_status_round_trips(crds: client.CustomObjectsApi, ns: str) -> None:
    """Every field the controller writes is kept (none is pruned by the schema)."""
    create(crds, ns, obj("Model", "status-rt", hf()))
    answer = crds.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, "models", "status-rt", {"status": READY_STATUS})
    assert isinstance(answer, dict)
    assert answer["status"] == READY_STATUS


@pytest.mark.parametrize(("status", "message"), [
    ({"phase": "Done"}, 'status.phase: Unsupported value: "Done"'),
    ({"progress": {"percent": 101}}, "status.progress.percent: Invalid value: 101"),
    ({"artifact": {"digest": "md5:abc"}}, "status.artifact.digest: Invalid value: \"md5:abc\""),
    ({"conditions": [{"type": "Ready", "status": "Maybe", "reason": "X", "message": "",
                      "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
     'status.conditions[0].status: Unsupported value: "Maybe"'),
], ids=["phase", "percent", "digest", "condition-status"])
def test_invalid_status_rejected(crds: client.CustomObjectsApi, ns: str,
                                 status: dict[str, Any], message: str) -> None:
    name = f"st-{uuid.uuid4().hex[:8]}"
    create(crds, ns, obj("Model", name, hf()))
    with pytest.raises(ApiException) as err:
        crds.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "models", name,
                                                   {"status": status})
    assert err.value.status == 422
    assert message in message_of(err.value), err.value.body


# --- kubectl ------------------------------------------------------------------------


def _columns(line: str) -> list[str]:
    return re.split(r"\s{2,}|\s(?=\S)", line.strip()) if line.strip() else []


def test_kubectl_printer_columns(kube: kubeenv.KubeEnv, crds: client.CustomObjectsApi) -> None:
    ns = f"print-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", ns)
    create(crds, ns, obj("Model", "qwen", hf()))
    crds.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "models", "qwen",
                                               {"status": READY_STATUS})

    out = kube.kubectl("get", "models", "-n", ns).stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "PROGRESS", "FORMAT", "SIZE", "AGE"]
    assert out[1].split()[:5] == ["qwen", "Ready", "100", "Safetensors", "988097824"]

    wide = kube.kubectl("get", "models", "-n", ns, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "PROGRESS", "FORMAT", "SIZE", "AGE",
                               "FAMILY", "REVISION", "DIGEST"]
    row = wide[1].split()
    assert row[6:] == ["qwen2", READY_STATUS["source"]["resolvedRevision"], f"sha256:{HEX}"]

    # the short name and the category reach the same objects
    assert kube.kubectl("get", "mdl", "-n", ns, "-o", "name").stdout.strip() == \
        "model.modelcache.io/qwen"
    assert "model.modelcache.io/qwen" in kube.kubectl(
        "get", "modelcache", "-n", ns, "-o", "name").stdout


def test_kubectl_cluster_printer_columns(kube: kubeenv.KubeEnv,
                                         crds: client.CustomObjectsApi) -> None:
    name = f"print-{uuid.uuid4().hex[:8]}"
    create(crds, "", obj("ClusterModel", name, hf()))
    out = kube.kubectl("get", "cmdl", name).stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "PROGRESS", "FORMAT", "SIZE", "AGE"]
    create(crds, "", obj("ModelCatalogSource", name, {"url": "https://c.example"}))
    out = kube.kubectl("get", "mcs", name).stdout.splitlines()
    assert out[0].split() == ["NAME", "URL", "READY", "LISTED", "AGE"]
    assert out[1].split()[:2] == [name, "https://c.example"]


def test_kubectl_apply_reports_cel_message(kube: kubeenv.KubeEnv,
                                           crds: client.CustomObjectsApi) -> None:
    """What a user sees from the real kubectl, not only from the Python client."""
    bad = yaml.safe_dump(obj("Model", "bad", {"source": {}}) | {"metadata": {
        "name": "bad", "namespace": "default"}})
    done = kube.kubectl("apply", "-f", "-", input=bad, check=False)
    assert done.returncode != 0
    assert 'The Model "bad" is invalid: spec.source: Invalid value: ' \
        "exactly one of huggingFace, ollama, http, s3, pvc, upload must be set" in done.stderr


# --- the two model CRDs stay in step (no API server needed) -------------------------


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in ("description", "message")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def test_model_and_cluster_model_schemas_match() -> None:
    crds = load_crds()
    model, cluster = (crds[k]["spec"]["versions"][0] for k in ("Model", "ClusterModel"))
    assert model["additionalPrinterColumns"] == cluster["additionalPrinterColumns"]
    ms, cs = (copy.deepcopy(v["schema"]["openAPIV3Schema"]) for v in (model, cluster))
    assert ms["properties"]["status"] == cs["properties"]["status"]
    msrc = ms["properties"]["spec"]["properties"]["source"]
    csrc = cs["properties"]["spec"]["properties"]["source"]
    assert "pvc" in msrc["properties"] and "catalog" not in msrc["properties"]
    assert "catalog" in csrc["properties"] and "pvc" not in csrc["properties"]
    del msrc["properties"]["pvc"], csrc["properties"]["catalog"]
    # spec.validation runs a Job in the Model's namespace: a ClusterModel has none
    mspec, cspec = (x["properties"]["spec"]["properties"] for x in (ms, cs))
    assert "validation" in mspec and "validation" not in cspec
    del mspec["validation"]
    # spec.sharing grants a namespaced Model to other namespaces: a ClusterModel is everyone's
    assert "sharing" in mspec and "sharing" not in cspec
    del mspec["sharing"]
    del msrc["x-kubernetes-validations"][0], csrc["x-kubernetes-validations"][0]
    assert _strip(ms) == _strip(cs)
    for kind in PLURALS:
        crd = crds[kind]
        assert crd["spec"]["names"]["plural"] == PLURALS[kind]
        assert "all" not in crd["spec"]["names"]["categories"]
