"""A Model's source → its publish Job: name, target reference, command, env, placement.

The Job name is a pure function of what a publish must reflect: the model's
uid and generation, the ``modelcache.io/reimport`` annotation, the upstream
revision the schedule saw move, and a hash of the auth Secret's value. So a
restarted controller *finds* the Job it created before instead of creating a
second one (a create that races answers 409 and is taken as found), and a
change to any of those inputs makes a new Job.

All publish Jobs run in the controller's namespace. The registry push
credential stays there (a Job in a user namespace would need a copy of it,
and with it the power to overwrite other namespaces' artifacts); the source
credential a Model names (a tenant's Secret) is never copied: the Job
carries only which Secret and keys (annotation
``names.ANN_SOURCE_CREDENTIAL``) and asks the manager for the values at
start, over HTTPS with its report token (``controller/models/credentials.py``,
``jobs/secretfiles.fetch``). The per-Job Secret (``job_secret``, deleted
when the Job has finished) holds only the controller's own material: the
source URI (it may carry a presigned query or a user:password), the
registry login, the report token and the registry's CA. It is mounted
read-only as files (``jobspec.SecretFiles``), so none of them is in the
Job's command line or env values. The pod gets no service-account token:
it talks to the source, the registry and the manager's endpoints only.

The work directory (``WORK_DIR``: the staging store, where each source file
is streamed while it is hashed) is an ``emptyDir`` unless the manager is
given ``--publish-work-size``: then it is a PVC per Job (``work_claim``,
made and removed by ``workvolume.py``), so the Job's next pod finds the
``.part`` files of the one killed before it and resumes each with ``Range``
instead of fetching the source again from byte 0.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any

from api import jobresult, model, names
from controller import jobspec, secretrefs
from controller.errors import PermanentError
from controller.models import policy
from ingest.sources.catalog import build_uri
from kube import client as kube
from modelpack.oci import mirrors

WORK_DIR = "/var/lib/modelcache/work"
WORKER_GID = jobspec.WORKER_GID
SOURCE_KEY = "source"  # the per-Job Secret's key for the source URI (``--source-file``)
REPORT_TOKEN = "MODELCACHE_REPORT_TOKEN"
CREDENTIALS_URL = "MODELCACHE_CREDENTIALS_URL"  # the worker's env: where to ask (``lend``)


@dataclass(frozen=True)
class WorkVolume:
    """A publish Job's work directory on a PVC that outlives its pods (see the module doc).

    ``size``: the claim's request, a Kubernetes quantity; it must hold the
    largest model published (an archive twice over: it is staged, then
    expanded). ``storage_class``: None for the cluster's default class.
    """

    size: str
    storage_class: str | None = None


@dataclass(frozen=True)
class Settings:
    """What the manager's flags decide for every Job."""

    namespace: str  # the controller's own namespace: Jobs, Leases, ClusterModel Secrets
    registry: str  # DMCR host[:port]
    image: str = "modelcache-controller:latest"
    registry_insecure: bool = False
    registry_secret: str | None = None  # Secret with username/password keys, in ``namespace``
    # the DMCR's CA bundle, a file the manager keeps current (controller/dmcrtls.py); each
    # Job gets its content as ``ca.crt`` of its Secret (``REGISTRY_CA``). None: public CAs
    registry_ca: str | None = None
    hf_endpoint: str | None = None
    report_url: str | None = None
    report_key: bytes = b""
    # where a Job asks for its source credential (``GET <url>/credentials/<job>``): the
    # token realm's HTTPS address; the plain report URL only in the demo and tests. None:
    # no lending, and a Model that names a Secret is refused (``lend``)
    credentials_url: str | None = None
    backoff_limit: int = 3
    # seconds (the manager's --job-active-deadline, --job-ttl); a Model's
    # spec.publish.timeout / ttlAfterFinished replace them for its own Job
    active_deadline: int | None = None
    ttl_after_finished: int | None = 24 * 3600
    service_account: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    work_volume: WorkVolume | None = None  # None: an emptyDir, gone with each pod
    publish_policy: policy.Policy = policy.DEFAULT  # what a Model's spec.publish may ask
    # generations a model keeps in status.history and the registry (--history-keep;
    # controller/models/history.py collects older ones no pod mounts)
    history_keep: int = 5
    # registry mirrors the materializer Jobs ask first (controller/delivery/materializer.py)
    registry_mirrors: mirrors.Mirrors = field(default_factory=mirrors.Mirrors)


@dataclass(frozen=True)
class SecretUse:
    """A source credential: which Secret key becomes which env var of the worker."""

    namespace: str
    name: str
    keys: dict[str, str]  # env var -> key in the Secret
    optional: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Plan:
    """How to publish one model: the worker's source URI, extra args, credentials."""

    kind: str  # "publish" | "upload" | "pvc" | "unsupported"
    uri: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    secret: SecretUse | None = None
    reason: str = ""
    message: str = ""
    key_extra: str = ""  # more publish-key input (a catalog import: URL, CA, pinned digest)


def _short(text: str, n: int) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower())[:n].strip("-") or "x"




def target(obj: dict[str, Any], settings: Settings) -> str:
    """The registry reference a model is published to (tag: its generation)."""
    meta = obj["metadata"]
    gen = int(meta.get("generation") or 1)
    if model.model_kind(obj) == "ClusterModel":
        repo = f"cluster/{meta['name']}"
    else:
        repo = f"models/{meta['namespace']}/{meta['name']}"
    return f"{settings.registry}/{repo}:gen-{gen}"


def publish_key(obj: dict[str, Any], secret_hash: str) -> str:
    meta = obj["metadata"]
    ann = meta.get("annotations") or {}
    parts = [str(meta.get("uid", "")), str(meta.get("generation") or 1),
             ann.get(names.REIMPORT, ""), ann.get(names.UPSTREAM, ""), secret_hash]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def job_name(obj: dict[str, Any], key: str) -> str:
    prefix = "mcc" if model.model_kind(obj) == "ClusterModel" else "mc"
    meta = obj["metadata"]
    ns = "" if prefix == "mcc" else _short(str(meta.get("namespace", "")), 12) + "-"
    return f"{prefix}-{ns}{_short(str(meta['name']), 30)}-{key}"[:63].strip("-")


def report_token(settings: Settings, name: str) -> str:
    """The bearer a Job presents to the report endpoint: good for that Job's model only."""
    return hmac.new(settings.report_key, name.encode(), hashlib.sha256).hexdigest()


def _auth(ref: Any, namespace: str, keys: dict[str, str | None], default_key: str) -> SecretUse | None:
    if not ref:
        return None
    if not isinstance(ref, dict) or not ref.get("name"):
        raise PermanentError("authSecretRef needs a name", reason="InvalidSource")
    mapping = {env: str(ref.get("key") or default_key if key is None else key)
               for env, key in keys.items()}
    return SecretUse(namespace, str(ref["name"]), mapping)


def check_secret(obj: dict[str, Any], use: SecretUse, cached: dict[str, Any] | None,
                 settings: Settings) -> None:
    """Refuse (``PermanentError``, ``SecretNotAllowed``) a Secret ``obj`` may not lend its source.

    A Model's Secret must be in the Model's own namespace; one in the
    controller's namespace (every ClusterModel's, a catalog import's) must be
    opted in by an admin and not be one of the controller's own
    (``controller.secretrefs``). ``cached``: the Secret as the cache holds it
    (``reconciler.secret_transform``), None when absent.
    """
    ns = obj["metadata"].get("namespace")
    if model.model_kind(obj) != "ClusterModel" and use.namespace != ns:
        raise PermanentError(f"Secret {use.namespace}/{use.name} is outside the Model's "
                             f"namespace {ns}", reason=secretrefs.REASON)
    if use.namespace != settings.namespace:
        return
    labels = None if cached is None else (cached.get("metadata") or {}).get("labels") or {}
    reserved = frozenset({settings.registry_secret} if settings.registry_secret else ())
    why = secretrefs.refusal(use.namespace, use.name, labels, reserved=reserved)
    if why is not None:
        raise PermanentError(why, reason=secretrefs.REASON)


def plan(obj: dict[str, Any], settings: Settings,
         catalog_source: dict[str, Any] | None = None) -> Plan:
    """The publish plan for ``obj``'s source; ``PermanentError`` for a source that cannot be.

    ``catalog_source``: the ModelCatalogSource a ``source.catalog`` import
    names, once its digest is pinned in ``status.catalog``
    (``catalogsources.ensure_pin``)."""
    spec = obj.get("spec") or {}
    source = spec.get("source") or {}
    meta = obj["metadata"]
    cluster = model.model_kind(obj) == "ClusterModel"
    # a ClusterModel's Secret may only live in the controller's namespace (DESIGN.md)
    secret_ns = settings.namespace if cluster else str(meta.get("namespace"))
    chosen = [k for k, v in source.items() if v is not None]
    if len(chosen) != 1:
        raise PermanentError(f"spec.source must set exactly one source, got {chosen or 'none'}",
                             reason="InvalidSource")
    kind = chosen[0]
    s = source[kind] or {}
    args: list[str] = []
    env: list[tuple[str, str]] = []
    fmt = spec.get("format")
    if fmt and fmt != "Auto":
        args += ["--format", str(fmt)]
    if kind == "huggingFace":
        repo = str(s.get("repo") or "")
        if not repo:
            raise PermanentError("source.huggingFace.repo is empty", reason="InvalidSource")
        uri = f"hf://{repo}@{s.get('revision') or 'main'}"
        for g in s.get("include") or []:
            args += ["--include", str(g)]
        for g in s.get("exclude") or []:
            args += ["--exclude", str(g)]
        if settings.hf_endpoint:
            env.append(("HF_ENDPOINT", settings.hf_endpoint))
        secret = _auth(s.get("authSecretRef"), secret_ns, {"HF_TOKEN": None}, "token")
        return Plan("publish", uri, tuple(args), tuple(env), secret)
    if kind == "ollama":
        host = s.get("registry") or "registry.ollama.ai"
        uri = f"ollama://{host}/{s.get('model')}:{s.get('tag') or 'latest'}"
        # a private registry: a bearer token (key ``token``, or the ref's ``key``), or a
        # ``username``/``password`` pair for Basic auth; whichever the Secret holds
        secret = _auth(s.get("authSecretRef"), secret_ns, {
            "MODELCACHE_HTTP_TOKEN": None, "MODELCACHE_SOURCE_USERNAME": "username",
            "MODELCACHE_SOURCE_PASSWORD": "password"}, "token")
        if secret is not None:
            secret = SecretUse(secret.namespace, secret.name, secret.keys,
                               frozenset(secret.keys))
        return Plan("publish", uri, tuple(args), tuple(env), secret)
    if kind == "http":
        uri = str(s.get("url") or "")
        if s.get("sha256"):
            args += ["--sha256", str(s["sha256"])]
        if s.get("archive"):
            args += ["--archive", str(s["archive"])]
        secret = _auth(s.get("authSecretRef"), secret_ns, {"MODELCACHE_HTTP_TOKEN": None},
                       "token")
        return Plan("publish", uri, tuple(args), tuple(env), secret)
    if kind == "s3":
        uri = f"s3://{s.get('bucket')}/{s.get('prefix') or ''}"
        if s.get("endpoint"):
            args += ["--endpoint", str(s["endpoint"])]
        if s.get("region"):
            args += ["--region", str(s["region"])]
        ref = s.get("authSecretRef")
        secret = None
        if ref:
            secret = SecretUse(secret_ns, str(ref.get("name")), {
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN": "AWS_SESSION_TOKEN"},
                frozenset({"AWS_SESSION_TOKEN"}))
        return Plan("publish", uri, tuple(args), tuple(env), secret)
    if kind == "upload":
        return Plan("upload", reason="WaitForUpload",
                    message="waiting for files through the upload gateway")
    if kind == "catalog":
        if not cluster:
            raise PermanentError("source.catalog is for ClusterModels only",
                                 reason="InvalidSource")
        digest = str(((obj.get("status") or {}).get("catalog") or {}).get("digest") or "")
        if catalog_source is None or not digest:
            return Plan("unsupported", reason="CatalogImportPending",
                        message="waiting for the remote digest to be pinned")
        return _catalog_plan(s, catalog_source, digest, settings, tuple(args))
    if kind == "pvc":
        # read by a Job in the Model's namespace, published through the upload gateway
        # (pvcsource.py): the only source whose bytes cannot reach our namespace directly
        if cluster:
            raise PermanentError("source.pvc is for Models only: a PVC is namespaced",
                                 reason="InvalidSource")
        if not s.get("claimName"):
            raise PermanentError("source.pvc.claimName is empty", reason="InvalidSource")
        return Plan("pvc", f"pvc://{s['claimName']}/{str(s.get('path') or '').lstrip('/')}")
    raise PermanentError(f"unknown source kind {kind!r}", reason="InvalidSource")


def _catalog_plan(s: dict[str, Any], src: dict[str, Any], digest: str, settings: Settings,
                  args: tuple[str, ...]) -> Plan:
    """A catalog import: the pinned digest from the source's URL, its CA and token Secret."""
    spec = src.get("spec") or {}
    url = str(spec.get("url") or "")
    env: list[tuple[str, str]] = []
    if spec.get("caBundle"):
        try:
            env.append(("MODELCACHE_CATALOG_CA", base64.b64decode(str(spec["caBundle"])).decode()))
        except ValueError as e:
            raise PermanentError("the ModelCatalogSource's caBundle is not base64 PEM",
                                 reason="InvalidSource") from e
    ref = spec.get("tokenSecretRef")
    secret = None
    if isinstance(ref, dict) and ref.get("name"):
        # a cluster-scoped source: the token Secret is always in the controller's namespace
        secret = SecretUse(settings.namespace, str(ref["name"]),
                           {"MODELCACHE_CATALOG_TOKEN": str(ref.get("key") or "token")})
    uri = build_uri(url, str(s.get("model") or ""), digest)
    extra = hashlib.sha256(f"{uri}\0{spec.get('caBundle') or ''}".encode()).hexdigest()[:12]
    return Plan("publish", uri, args, tuple(env), secret, key_extra=extra)


def copied_secret_name(job: str) -> str:
    return f"{job}-src"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def job_secret(obj: dict[str, Any], job: str, p: Plan, settings: Settings,
               registry: dict[str, str] | None = None,
               registry_ca: bytes | None = None) -> dict[str, Any]:
    """The per-Job Secret: the controller's own secrets the publish Job reads, one key a file.

    ``registry``: the data of ``settings.registry_secret`` (``username``/``password``);
    ``registry_ca``: the DMCR's CA bundle (public, but one mount is simpler than two).
    The source credential (``p.secret``) is not here: it is lent at run time (``lend``).
    """
    picked = {SOURCE_KEY: _b64(p.uri)}
    if registry_ca:
        picked[jobspec.REGISTRY_CA[1]] = base64.b64encode(registry_ca).decode()
    if settings.report_url or (p.secret is not None and settings.credentials_url):
        picked[REPORT_TOKEN] = _b64(report_token(settings, job))
    for var, key in jobspec.REGISTRY_LOGIN:
        if registry and key in registry:
            picked[var] = registry[key]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": copied_secret_name(job), "namespace": settings.namespace,
                         "labels": labels(obj, None)},
            "data": picked}


def check_keys(use: SecretUse, data: dict[str, str]) -> None:
    """``PermanentError`` (``SecretKeyNotFound``) when the Secret lacks a key the worker needs."""
    for env, key in use.keys.items():
        if key not in data and env not in use.optional:
            raise PermanentError(f"Secret {use.namespace}/{use.name} has no key {key!r}",
                                 reason="SecretKeyNotFound")


def lend(use: SecretUse | None, job: str, settings: Settings) -> tuple[dict[str, str],
                                                                       list[dict[str, Any]]]:
    """A Job's source credential by reference: (annotations, env) of the Job.

    The annotation names the Secret and the keys the manager may hand this Job
    (``credentials.Lender`` reads it, never a name the worker sends); the env var
    tells the worker where to ask. ``PermanentError`` when this manager lends nothing."""
    if use is None:
        return {}, []
    if not settings.credentials_url:
        raise PermanentError("this manager has no credential endpoint (--credentials-url): "
                             "a source credential cannot reach the publish Job",
                             reason="CredentialEndpointMissing")
    ann = json.dumps({"namespace": use.namespace, "name": use.name, "keys": use.keys,
                      "optional": sorted(use.optional)}, sort_keys=True)
    url = f"{settings.credentials_url.rstrip('/')}/credentials/{job}"
    return {names.ANN_SOURCE_CREDENTIAL: ann}, [{"name": CREDENTIALS_URL, "value": url}]


def lent(job: dict[str, Any]) -> SecretUse | None:
    """The ``SecretUse`` a Job's annotation names (``lend``); None without one or malformed."""
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(names.ANN_SOURCE_CREDENTIAL)
    try:
        d = json.loads(raw) if raw else None
        if not isinstance(d, dict):
            return None
        keys = {str(k): str(v) for k, v in dict(d["keys"]).items()}
        return SecretUse(str(d["namespace"]), str(d["name"]), keys,
                         frozenset(str(o) for o in d.get("optional") or ()))
    except (ValueError, KeyError, TypeError):
        return None


def secret_files(job: str, p: Plan, settings: Settings) -> jobspec.SecretFiles:
    """Which of ``job_secret``'s keys the worker is pointed at (``VAR_FILE``)."""
    keys = [REPORT_TOKEN] if settings.report_url else []
    if not settings.report_url and p.secret is not None and settings.credentials_url:
        keys = [REPORT_TOKEN]  # the credential endpoint's bearer
    if settings.registry_secret:
        keys += [var for var, _ in jobspec.REGISTRY_LOGIN]
    pairs = tuple((k, k) for k in keys)
    if settings.registry_ca:
        pairs += (jobspec.REGISTRY_CA,)
    return jobspec.SecretFiles(copied_secret_name(job), pairs)


def work_claim_name(job: str) -> str:
    return f"{job}-work"


def work_claim(obj: dict[str, Any], job: dict[str, Any], key: str,
               settings: Settings) -> dict[str, Any]:
    """The PVC that holds ``job``'s work directory across its pods (``settings.work_volume``).

    Owned by the Job, so the garbage collector takes it with the Job; the
    manager deletes it sooner, once the Job has finished (``workvolume.release``).
    ReadWriteOnce: one pod of the Job runs at a time (``parallelism`` 1), and a
    retry goes wherever the volume can be attached.
    """
    wv = settings.work_volume
    assert wv is not None
    name = str(job["metadata"]["name"])
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": wv.size}}}
    if wv.storage_class:
        spec["storageClassName"] = wv.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": work_claim_name(name), "namespace": settings.namespace,
                         "labels": {**labels(obj, key),
                                    "app.kubernetes.io/component": "publish-work"},
                         # not blockOwnerDeletion: that would need update on jobs/finalizers
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                              "name": name, "uid": job["metadata"]["uid"]}]},
            "spec": spec}


def labels(obj: dict[str, Any], key: str | None) -> dict[str, str]:
    meta = obj["metadata"]
    out = {names.LABEL_MANAGED: names.MANAGER, "app.kubernetes.io/component": "publish",
           names.LABEL_KIND: model.model_kind(obj), names.LABEL_NAME: str(meta["name"]),
           names.LABEL_UID: str(meta["uid"])}
    if meta.get("namespace"):
        out[names.LABEL_NAMESPACE] = str(meta["namespace"])
    if key:
        out[names.LABEL_KEY] = key
    return out


def report_env(settings: Settings, name: str) -> list[dict[str, Any]]:
    """Where Job ``name`` sends its progress; none without ``--report-url``. Its bearer
    (``report_token``) travels in the Job's Secret, as ``MODELCACHE_REPORT_TOKEN_FILE``."""
    if not settings.report_url:
        return []
    return [{"name": "MODELCACHE_REPORT_URL",
             "value": f"{settings.report_url.rstrip('/')}/report/{name}"}]


def build(obj: dict[str, Any], p: Plan, key: str, settings: Settings) -> dict[str, Any]:
    """The publish Job for ``obj`` under publish key ``key``."""
    name = job_name(obj, key)
    ref = target(obj, settings)
    cmd = ["modelcache-controller", "publish", "--source-file", jobspec.path(SOURCE_KEY),
           "--to", ref,
           "--work-dir", WORK_DIR, "--result-file", jobresult.TERMINATION_LOG,
           "--name", str(obj["metadata"]["name"]), *p.args]
    if settings.registry_insecure:
        cmd.append("--insecure-registry")
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in p.env]
    env += [{"name": k, "value": v} for k, v in sorted(settings.extra_env.items())]
    env += report_env(settings, name)
    lent_ann, lent_env = lend(p.secret, name, settings)
    env += lent_env
    owners = None
    if model.model_kind(obj) == "ClusterModel":
        # a namespaced dependent may have a cluster-scoped owner, not one in another namespace
        owners = [{
            "apiVersion": str(obj.get("apiVersion") or kube.CLUSTER_MODELS.api_version),
            "kind": "ClusterModel", "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    timeout, ttl = policy.job_times(obj)
    work: dict[str, Any] = {"name": "work", "emptyDir": {}}
    if settings.work_volume is not None:
        work = {"name": "work", "persistentVolumeClaim": {"claimName": work_claim_name(name)}}
    return jobspec.build(
        name=name, namespace=settings.namespace, labels=labels(obj, key),
        annotations={names.ANN_TARGET: ref, **lent_ann}, owners=owners, container="publish",
        image=settings.image, command=cmd, env=env,
        mounts=[{"name": "work", "mountPath": WORK_DIR}],
        volumes=[work], backoff_limit=settings.backoff_limit,
        placement=(obj.get("spec") or {}).get("publish"),
        active_deadline=timeout or settings.active_deadline,
        ttl_after_finished=settings.ttl_after_finished if ttl is None else ttl,
        service_account=settings.service_account, fs_group=WORKER_GID if settings.work_volume is not None else None,
        secret=secret_files(name, p, settings))


# a Job's own state (``jobresult.ACTIVE``/``COMPLETE``/``FAILED``), for this module's readers
state = jobresult.state
