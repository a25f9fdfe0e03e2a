"""The mutating admission webhook: an HTTPS AdmissionReview v1 server, and the
``Delivery`` bundle the manager starts (webhook, certificates, gate lifter).

Where it sits: the API server POSTs an AdmissionReview to ``/mutate`` for the
objects the MutatingWebhookConfiguration selects (webhookconfig.webhooks: only
objects that carry the model annotations). ``Admission.review`` binds a
model lookup to the request's namespace and calls ``inject.mutate``; models
come from the manager's informer caches, so an admission is CPU only. A
cache miss is checked with one live GET (2 s timeout): a Model created a
moment before its workload (``kubectl apply -f dir/``) may not be in the
cache yet, and refusing it would be wrong. That GET fails closed: an API
server that does not answer, answers an error, or answers anything but the
object asked for is a 503 denial (retry later), never an admission, and
nothing of it is kept. A webhook that cannot be reached at all is the API
server's ``failurePolicy: Fail`` (webhookconfig.py): the object is refused.

A ``<namespace>/<name>`` ref to another namespace's Model is looked up in
that namespace and answered only if its owner shares it with the request's
namespace (``api.sharing.granted``; namespace labels by a cached GET,
failing closed as a 503); else it is as absent (``inject.plan`` refuses).

Models themselves come here too, only to be checked, never patched: one
that names a Secret its author may not read is refused
(``secretaccess.py``: a SubjectAccessReview for each Secret a new or
changed source names, failing closed the same way).

Errors: ``InjectError`` is a denial with its code (400 bad annotation,
404 unknown model, 409 not usable now); anything else is a 500 denial
with a generic message (the details go to the log), never a crash of the
server.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import logging
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from api import inject, sharing
from api import names as c
from controller.delivery import gates, secretaccess, webhookconfig
from kube import certs
from kube import client as kube
from kube.events import Recorder
from kube.httpreply import reply
from kube.informer import Informer
from kube.namespaces import NamespaceLabels

log = logging.getLogger(__name__)

Obj = dict[str, Any]
# the API server itself refuses admission requests over 3 MiB (its request limit); an
# AdmissionReview carries the object twice and etcd caps one at 1.5 MiB
MAX_BODY = 4 << 20
MAX_CONCURRENT = 32  # requests in flight; beyond it a fast 429 instead of another thread
MODEL_GROUP = c.API_VERSION.partition("/")[0]
# the GIL's switch interval while the webhook serves (Python's default is 5 ms): an
# admission thread woken by the API server's request waits up to one interval for each
# of its socket reads and writes while the manager's other threads compute (watch
# events, reconciles, gate lifts); bench/scale measured it at the API server
SWITCH_INTERVAL = 0.0005
LOOKUP_TIMEOUT = 2.0  # a live GET on a cache miss; the API server gives us TIMEOUT_SECONDS
_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
            500: "InternalError", 503: "ServiceUnavailable"}


@dataclass(frozen=True)
class Config:
    """How the manager runs delivery (flags in controller/main.py)."""

    listen: tuple[str, int] = ("0.0.0.0", 9443)
    url: str | None = None  # clientConfig.url: out of cluster, tests
    service: str | None = None  # "name:port" of the Service in the controller's namespace
    secret: str = "modelcache-webhook-tls"  # CA + serving certificate, in the namespace
    config_name: str = "modelcache"  # the MutatingWebhookConfiguration
    default_mode: str = "NodeCache"  # when neither the workload nor the model says
    cert_check_interval: float = 3600.0
    # gate lifts in flight at once: a Model turning Ready frees all its pods together
    gate_workers: int = 16

    def __post_init__(self) -> None:
        if bool(self.url) == bool(self.service):
            raise ValueError("delivery needs exactly one of a webhook URL or Service")
        if self.default_mode not in c.MODES:
            raise ValueError(f"default delivery {self.default_mode!r}: one of "
                             f"{', '.join(c.MODES)}")


class Admission:
    """AdmissionReview in, AdmissionReview out."""

    def __init__(self, client: kube.Kube, models: Informer, cluster_models: Informer,
                 nodes: gates.NodeIndex, default_mode: str = "NodeCache",
                 metrics: Any = None) -> None:
        self.client = client
        self.models = models
        self.cluster_models = cluster_models
        self.nodes = nodes
        self.default_mode = default_mode
        self.metrics = metrics
        self.secrets = secretaccess.Checker(client)
        self.namespace_labels = NamespaceLabels(client)  # for spec.sharing.namespaceSelector

    def lookup(self, namespace: str) -> inject.Lookup:
        def look(ref: inject.Ref) -> Obj | None:
            obj = find(ref)
            if obj is None or not ref.namespace:
                return obj
            try:  # another namespace's Model: only if its owner shares it with this one
                return obj if sharing.granted(obj, namespace, self.namespace_labels) else None
            except kube.ApiError as e:
                raise inject.InjectError(f"cannot read the labels of namespace {namespace} "
                                         f"now ({_cause(e)}); retry", code=503) from e

        def find(ref: inject.Ref) -> Obj | None:
            if ref.kind == "Model":
                inf, res, ns = self.models, kube.MODELS, ref.namespace or namespace
            else:
                inf, res, ns = self.cluster_models, kube.CLUSTER_MODELS, ""
            obj = inf.get((ns, ref.name))
            if obj is not None:
                return obj
            try:
                found: Any = self.client.request("GET", res.path(ns or None, ref.name),
                                                 timeout=LOOKUP_TIMEOUT)
            except kube.NotFound:
                return None
            except (kube.ApiError, ValueError) as e:  # ValueError: an answer that is not JSON
                # fail closed: a refusal the user can retry, never an admission on a guess
                raise inject.InjectError(f"cannot look up {ref.kind} {ref.name} now "
                                         f"({_cause(e)}); retry", code=503) from e
            if not _is_the_object(found, ref.kind, ns, ref.name):
                raise inject.InjectError(f"cannot look up {ref.kind} {ref.name} now (the API "
                                         "server answered something else); retry", code=503)
            return dict(found)
        return look

    def review(self, body: Obj) -> Obj:
        t0 = time.monotonic()
        req = body.get("request") or {}
        uid = str(req.get("uid") or "")
        kind = str((req.get("kind") or {}).get("kind") or "")
        op = str(req.get("operation") or "")
        ns = str(req.get("namespace") or "")
        resp: Obj = {"uid": uid, "allowed": True}
        result = "allowed"
        try:
            if kind == "Model" and (req.get("kind") or {}).get("group") == MODEL_GROUP:
                self.secrets.check(req)  # admits or raises; never a patch
            else:
                res = inject.mutate(kind, req.get("object") or {}, operation=op, namespace=ns,
                                    lookup=self.lookup(ns), default_mode=self.default_mode,
                                    cached_labels=self.nodes, old=req.get("oldObject"))
                if res.patch:
                    resp["patchType"] = "JSONPatch"
                    resp["patch"] = base64.b64encode(json.dumps(res.patch).encode()).decode()
                    result = "mutated"
                if res.warnings:
                    resp["warnings"] = res.warnings
        except (inject.InjectError, secretaccess.Refused) as e:
            result = "denied"
            resp = _deny(uid, e.code, str(e))
        except Exception:
            result = "error"
            log.exception("admission failed", extra={"kind": kind, "namespace": ns, "uid": uid})
            resp = _deny(uid, 500, "modelcache webhook: internal error (see the controller log)")
        seconds = time.monotonic() - t0
        if self.metrics is not None:
            self.metrics.admissions.labels(kind, op, result).inc()
            self.metrics.admission_seconds.observe(seconds)
        log.debug("admission", extra={"kind": kind, "operation": op, "namespace": ns,
                                      "object": (req.get("object") or {}).get("metadata", {})
                                      .get("name"), "result": result,
                                      "ms": round(seconds * 1000, 2)})
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp}


def _is_the_object(found: Any, kind: str, namespace: str, name: str) -> bool:
    """Whether a live GET answered the object asked for (not a Status, a page, or another
    object): only then may its spec and status shape the admission."""
    if not isinstance(found, dict) or found.get("kind") != kind:
        return False
    meta = found.get("metadata")
    return (isinstance(meta, dict) and meta.get("name") == name
            and (meta.get("namespace") or "") == namespace)


def _cause(e: Exception) -> str:
    """The kind of failure, for the user's message: a status code, never a body."""
    status = getattr(e, "status", 0)
    return f"API server answered {status}" if status else "API server unreachable or garbled"


def _deny(uid: str, code: int, message: str) -> Obj:
    return {"uid": uid, "allowed": False,
            "status": {"code": code, "reason": _REASONS.get(code, "BadRequest"),
                       "message": message}}


# -- HTTPS ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the API server keeps connections: no handshake per call
    server: _Server
    timeout = 15  # a client that stalls mid-request frees its thread

    # headers and body go out as two writes: with Nagle on, the second waits for the
    # API server's delayed ACK (~40 ms per admission)
    disable_nagle_algorithm = True

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        reply(self, code, body, ctype)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        if urlsplit(self.path).path != webhookconfig.WEBHOOK_PATH:
            self._send(404, b"not found\n", "text/plain")
            return
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if length > MAX_BODY:  # refused unread
            self.close_connection = True
            self._send(413, b'{"error":"an AdmissionReview over 4 MiB"}')
            return
        if length <= 0:
            self.close_connection = True
            self._send(400, b'{"error":"a JSON AdmissionReview with a Content-Length"}')
            return
        if not self.server.slots.acquire(blocking=False):
            self.close_connection = True
            self._send(429, b'{"error":"too many requests in flight"}')
            return
        try:
            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
                    raise ValueError("no request")
            except ValueError:
                self._send(400, b'{"error":"not an AdmissionReview"}')
                return
            self._send(200, json.dumps(self.server.admission.review(body)).encode())
        finally:
            self.server.slots.release()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    admission: Admission
    slots: threading.BoundedSemaphore


def create_server(address: tuple[str, int], admission: Admission,
                  bundle: certs.Bundle) -> tuple[ThreadingHTTPServer, ssl.SSLContext]:
    """The HTTPS server (not started) and its TLS context; ``reload(ctx, bundle)`` swaps
    the certificate for new connections."""
    ctx = certs.server_context(bundle.cert, bundle.key)
    server = _Server(address, _Handler)
    server.admission = admission
    server.slots = threading.BoundedSemaphore(MAX_CONCURRENT)
    # the handshake happens on the first read, in the request's thread, so a slow
    # client cannot hold up accept() for everyone else
    server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                    do_handshake_on_connect=False)
    return server, ctx


def reload(ctx: ssl.SSLContext, bundle: certs.Bundle) -> None:
    certs.load_chain(ctx, bundle.cert, bundle.key)


def _tune_for_latency() -> None:
    """Admissions wait on the GIL behind the manager's other threads: hand it over sooner,
    and take what exists by now (the modules, the ``kubernetes`` package's model classes)
    out of the collector's full passes, whose pauses stop every thread, this one too."""
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
    gc.freeze()


# -- the bundle the manager runs --------------------------------------------------------


class Delivery:
    """Webhook server + certificates + configuration (every replica) and the gate lifter
    (the leader). The informers are the manager's; this only adds handlers."""

    def __init__(self, client: kube.Kube, cfg: Config, namespace: str, *, models: Informer,
                 cluster_models: Informer, pods: Informer, nodes: Informer,
                 pvcs: Informer | None, recorder: Recorder, metrics: Any = None) -> None:
        self.client = client
        self.cfg = cfg
        self.namespace = namespace
        self.node_index = gates.NodeIndex()
        nodes.handlers.append(self.node_index.handle)
        self.admission = Admission(client, models, cluster_models, self.node_index,
                                   cfg.default_mode, metrics)
        self.lifter = gates.GateLifter(client, pods=pods, models=models,
                                       cluster_models=cluster_models, pvcs=pvcs,
                                       nodes=self.node_index, recorder=recorder,
                                       metrics=metrics, workers=cfg.gate_workers)
        self.keeper = certs.CertKeeper(client, namespace, cfg.secret, self.hosts())
        self.server: ThreadingHTTPServer | None = None
        self._ctx: ssl.SSLContext | None = None
        self._served: bytes = b""
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def hosts(self) -> list[str]:
        if self.cfg.url:
            return [str(urlsplit(self.cfg.url).hostname)]
        svc = str(self.cfg.service).partition(":")[0]
        return [f"{svc}.{self.namespace}.svc", f"{svc}.{self.namespace}.svc.cluster.local",
                f"{svc}.{self.namespace}", svc]

    def client_config(self, bundle: certs.Bundle) -> Obj:
        if self.cfg.url:
            return webhookconfig.url_client_config(self.cfg.url, bundle.ca_bundle_b64)
        svc, _, port = str(self.cfg.service).partition(":")
        return webhookconfig.service_client_config(self.namespace, svc, int(port or 443),
                                                   bundle.ca_bundle_b64)

    def sync_certificates(self) -> None:
        """Ensure the Secret and the configuration, then serve the (maybe new) certificate:
        in this order, so the API server trusts a new CA before it is presented."""
        bundle = self.keeper.ensure()
        webhookconfig.ensure_webhook_config(self.client, self.cfg.config_name,
                                            webhookconfig.webhooks(self.client_config(bundle)))
        if self._ctx is not None and bundle.cert != self._served:
            reload(self._ctx, bundle)
            log.info("webhook serving a new certificate")
        self._served = bundle.cert

    def start(self) -> None:
        bundle = self.keeper.ensure()
        webhookconfig.ensure_webhook_config(self.client, self.cfg.config_name,
                                            webhookconfig.webhooks(self.client_config(bundle)))
        self.server, self._ctx = create_server(self.cfg.listen, self.admission, bundle)
        self._served = bundle.cert
        _tune_for_latency()
        threading.Thread(target=self.server.serve_forever, daemon=True, name="webhook").start()
        threading.Thread(target=self._keep, daemon=True, name="webhook-certs").start()
        log.info("webhook listening", extra={"listen": f"{self.cfg.listen[0]}:{self.port}",
                                             "configuration": self.cfg.config_name})

    def _keep(self) -> None:
        while not self._stop.wait(self.cfg.cert_check_interval):
            try:
                self.sync_certificates()
            except Exception as e:  # next pass retries; the current certificate still serves
                log.warning("webhook certificate check failed", extra={"error": str(e)[:300]})

    def lead(self) -> None:
        self.lifter.start()

    def stop(self) -> None:
        self._stop.set()
        self.lifter.stop()
        if self.server is not None:
            self.server.shutdown()
            with contextlib.suppress(OSError):
                self.server.server_close()
