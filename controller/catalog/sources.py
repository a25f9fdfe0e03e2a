"""ModelCatalogSource: list a remote catalog into status; pin a ClusterModel's import.

Two jobs, both on the importing side of the catalog (the serving side is
``controller.catalog``):

* ``Controller`` reconciles ``ModelCatalogSource`` objects on its own work
  queue: read the token Secret (controller's namespace), list the remote
  catalog over HTTPS with the CA bundle, and write ``status.models``,
  ``lastListedAt`` and two conditions: ``Reachable`` (the catalog answered
  over TLS) and ``Ready`` (it answered with a listing for our token). A
  failure keeps the last listing (imports already pinned need nothing from
  it) and retries with backoff; success re-lists every ``refreshInterval``.
  A change of the token Secret re-lists at once.
* ``ensure_pin`` is the ClusterModel reconciler's first step for
  ``source.catalog``: before any Job, freeze the remote digest (and the
  remote revision) from the source's listing into ``status.catalog``. Once
  frozen for this generation and ``modelcache.io/reimport`` value it is
  never re-resolved, whatever the remote does; the publish Job imports
  exactly that digest and waits out source-side failures. A declared
  ``spec.format`` the listing contradicts is refused first (Failed,
  ``FormatMismatch``), and the Job checks it against the artifact's config.

Token values never reach status, events or logs: only Secret names do. The
token Secret must carry the admin's opt-in label and not be one of the
controller's own (``controller.secretrefs``): else the source is not listed
(Ready False, ``SecretNotAllowed``) and no token leaves the cluster.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import time
from collections.abc import Callable, Hashable
from typing import Any

from api import conditions as c
from api import names
from api.model import ModelView, ready_condition
from controller import secretrefs
from controller.errors import PermanentError
from ingest.sources import base as sources_base
from ingest.sources import catalog, netpolicy
from kube import client as kube
from kube.informer import Informer
from kube.workqueue import WorkerPool, WorkQueue

log = logging.getLogger(__name__)

KIND = "ModelCatalogSource"
DEFAULT_REFRESH = 3600.0
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PENDING_RECHECK = 30.0  # seconds between looks while an import waits for its source


def duration(text: str | None, default: float = DEFAULT_REFRESH) -> float:
    """``1h30m``, ``10m``, ``90s`` → seconds (the CRD's own pattern); ``default`` if unset."""
    if not text:
        return default
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def ca_pem(spec: dict[str, Any]) -> bytes | None:
    raw = spec.get("caBundle")
    if not raw:
        return None
    try:
        return base64.b64decode(str(raw), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("caBundle is not base64") from e


def token_ref(spec: dict[str, Any]) -> tuple[str, str] | None:
    ref = spec.get("tokenSecretRef")
    if not isinstance(ref, dict) or not ref.get("name"):
        return None
    return str(ref["name"]), str(ref.get("key") or "token")


class Controller:
    """The ModelCatalogSource reconciler, with its own queue and worker threads."""

    def __init__(self, client: kube.Kube, namespace: str, sources: Informer, secrets: Informer,
                 *, workers: int = 2, on_listed: Callable[[str], None] | None = None,
                 list_timeout: tuple[float, float] = (5.0, 30.0)) -> None:
        self.client = client
        self.namespace = namespace
        self.sources = sources
        self.secrets = secrets
        self.workers = workers
        self.on_listed = on_listed or (lambda name: None)
        self.list_timeout = list_timeout
        self.queue = WorkQueue(base_delay=2.0, max_delay=300.0, name="catalogsources")
        self._pool = WorkerPool(self.queue, self._handle, workers=self.workers,
                                name="catalogsource")
        self.last_list_seconds = 0.0
        sources.handlers.append(self._on_source)
        secrets.handlers.append(self._on_secret)

    # -- events ----------------------------------------------------------------

    def _on_source(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        name = obj["metadata"]["name"]
        if event != "DELETED":
            meta, was = obj["metadata"], (old or {}).get("metadata") or {}
            # our own status writes need no pass; spec and annotations do
            if old is None or meta.get("generation") != was.get("generation") \
                    or meta.get("annotations") != was.get("annotations"):
                self.queue.add(name, urgent=True)
        self.on_listed(name)  # imports waiting for this source take another look

    def _on_secret(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        meta = obj["metadata"]
        if meta.get("namespace") != self.namespace:
            return
        if old is not None and old.get("hashes") == obj.get("hashes") and event != "DELETED" \
                and old["metadata"].get("labels") == meta.get("labels"):
            return  # a label change may lend the Secret to sources (controller.secretrefs)
        for src in self.sources.items():
            ref = token_ref(src.get("spec") or {})
            if ref is not None and ref[0] == meta.get("name"):
                self.queue.add(src["metadata"]["name"], urgent=True)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def _handle(self, name: Hashable) -> None:
        try:
            again = self.reconcile(str(name))
            if again is None:
                self.queue.add_rate_limited(name)
            else:
                self.queue.forget(name)
                if again > 0:
                    self.queue.add_after(name, again)
        except Exception as e:
            delay = self.queue.add_rate_limited(name)
            log.warning("catalog source reconcile error", exc_info=not isinstance(
                e, kube.ApiError), extra={"source": name, "error": str(e)[:300],
                                          "retryIn": round(delay, 3)})

    # -- the reconcile ---------------------------------------------------------

    def _token(self, ref: tuple[str, str]) -> str:
        why = secretrefs.refusal(self.namespace, ref[0], None)  # the controller's own: not read
        if why is not None:
            raise PermissionError(why)
        try:
            secret = self.client.get(kube.SECRETS, ref[0], self.namespace)
        except kube.NotFound as e:
            raise LookupError(f"token Secret {self.namespace}/{ref[0]} not found") from e
        why = secretrefs.refusal(self.namespace, ref[0],
                                 (secret.get("metadata") or {}).get("labels") or {})
        if why is not None:
            raise PermissionError(why)
        raw = (secret.get("data") or {}).get(ref[1])
        if not raw:
            raise LookupError(f"token Secret {self.namespace}/{ref[0]} has no key {ref[1]!r}")
        return base64.b64decode(raw).decode().strip()

    def reconcile(self, name: str) -> float | None:
        """List one source; seconds until the next listing, or None: retry with backoff."""
        obj = self.sources.get(("", name))
        if obj is None:
            return 0.0
        spec = obj.get("spec") or {}
        try:
            refresh = duration(spec.get("refreshInterval"))
            pem = ca_pem(spec)
        except ValueError as e:
            self._write(obj, reachable=(False, "InvalidSpec", str(e)), ready=None)
            return 0.0  # only a spec change helps
        ref = token_ref(spec)
        token = None
        if ref is not None:
            try:
                token = self._token(ref)
            except PermissionError as e:  # before the token is read: nothing is sent
                self._write(obj, reachable=None, ready=(secretrefs.REASON, str(e)))
                return 0.0  # only a change of the source or the Secret's labels helps
            except LookupError as e:
                self._write(obj, reachable=None, ready=("TokenSecretNotFound", str(e)))
                return None  # the Secret watch brings it back sooner
        t0 = time.monotonic()
        try:
            with netpolicy.guarded():  # the source address policy, for this listing only
                client = catalog.CatalogClient(str(spec.get("url") or ""), token, ca_pem=pem,
                                               timeout=self.list_timeout, retries=0)
                try:
                    models = client.models()
                finally:
                    client.session.close()
        except netpolicy.SourceAddressDenied as e:
            self._write(obj, reachable=(False, e.reason, str(e)), ready=(e.reason, str(e)))
            return 0.0  # only a change of the URL (or of the admin's policy) helps
        except catalog.CatalogAuthError as e:
            self._write(obj, reachable=(True, "Answered", "the catalog answered over TLS"),
                        ready=(e.reason, str(e)))
            return None
        except catalog.CatalogUnavailable as e:
            if e.reason in ("CatalogTLSError", "CatalogUnreachable"):
                self._write(obj, reachable=(False, e.reason, str(e)), ready=(e.reason, str(e)))
            else:
                self._write(obj, reachable=(True, "Answered", "the catalog answered"),
                            ready=(e.reason, str(e)))
            return None
        except (catalog.CatalogNotFound, sources_base.SourceError) as e:
            reason = getattr(e, "reason", "CatalogBadResponse")
            self._write(obj, reachable=(True, "Answered", "the catalog answered"),
                        ready=(reason, str(e)))
            return None
        self.last_list_seconds = time.monotonic() - t0
        found = [_offered(m) for m in models]
        offered = sorted((m for m in found if m is not None), key=lambda m: m["name"])
        log.info("catalog listed", extra={"source": name, "models": len(offered),
                                          "seconds": round(self.last_list_seconds, 4)})
        self._write(obj, reachable=(True, "Answered", "the catalog answered over TLS"),
                    ready=None, models=offered)
        return refresh

    def _write(self, obj: dict[str, Any], *, reachable: tuple[bool, str, str] | None,
               ready: tuple[str, str] | None, models: list[dict[str, Any]] | None = None
               ) -> None:
        meta = obj["metadata"]
        gen = int(meta.get("generation") or 1)
        conds = []
        if reachable is not None:
            conds.append(c.condition("Reachable", reachable[0], reachable[1], reachable[2]))
        if ready is None:
            msg = f"{len(models or [])} model(s) offered"
            conds.append(c.condition("Ready", True, "Listed", msg))
        else:
            conds.append(c.condition("Ready", False, ready[0], ready[1]))
        current = obj.get("status") or {}
        patch: dict[str, Any] = {"observedGeneration": gen,
                                 "conditions": c.merge(current.get("conditions"), conds, gen)}
        if models is not None:
            patch["models"] = models
            patch["lastListedAt"] = c.now()
        if c.same(current, patch):
            return
        answer = self.client.patch(kube.MODEL_CATALOG_SOURCES, meta["name"], {"status": patch},
                                   sub="status")
        self.sources.observe(answer)
        self.on_listed(meta["name"])


def _offered(m: dict[str, Any]) -> dict[str, Any] | None:
    """One listing entry as status.models keeps it; None if it is not well-formed."""
    name, digest = str(m.get("name") or ""), str(m.get("digest") or "")
    if not _NAME.match(name) or len(name) > 253 or not _DIGEST.match(digest):
        return None
    out: dict[str, Any] = {"name": name, "digest": digest}
    if isinstance(m.get("sizeBytes"), int) and m["sizeBytes"] >= 0:
        out["sizeBytes"] = m["sizeBytes"]
    for k, limit in (("format", 32), ("family", 128), ("revision", 256)):
        if isinstance(m.get(k), str) and m[k]:
            out[k] = m[k][:limit]
    return out


# -- the ClusterModel side: pin the remote digest before the Job ---------------------


def is_import(obj: dict[str, Any]) -> bool:
    return isinstance((ModelView.of(obj).spec.get("source") or {}).get("catalog"), dict)


def pin_key(obj: dict[str, Any]) -> str:
    """What a pin is valid for: this generation and this reimport annotation."""
    view = ModelView.of(obj)
    parts = [view.uid, str(view.generation), str(view.annotations.get(names.REIMPORT, ""))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def ensure_pin(obj: dict[str, Any], sources: Informer | None,
               write_status: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
               ) -> tuple[dict[str, Any], dict[str, Any] | None, float | None]:
    """(obj, the ModelCatalogSource, None) when the import may go on to its Job;
    (obj, None, seconds) when it must wait (status says why), 0 meaning "nothing
    owed" (a Ready import whose source went away stays Ready)."""
    view = ModelView.of(obj)
    spec = view.spec.get("source", {}).get("catalog") or {}
    src_name, model = str(spec.get("sourceRef") or ""), str(spec.get("model") or "")
    pinned = bool(view.catalog_digest) and view.catalog_key == pin_key(obj)
    src = sources.get(("", src_name)) if sources is not None else None
    if src is None:
        if pinned and view.phase == c.READY:
            return obj, None, 0.0
        why = "the manager serves no catalog imports" if sources is None else \
            f"ModelCatalogSource {src_name!r} not found"
        return _wait(obj, write_status, "CatalogSourceNotFound", why), None, PENDING_RECHECK
    if pinned:
        return obj, src, None
    src_status = src.get("status") or {}
    ready: dict[str, Any] = next(
        (x for x in src_status.get("conditions") or [] if x.get("type") == "Ready"), {})
    offered = next((m for m in src_status.get("models") or [] if m.get("name") == model), None)
    if offered is None:
        if ready.get("status") != "True":
            msg = f"ModelCatalogSource {src_name!r} is not ready: " \
                  f"{ready.get('reason') or 'not listed yet'}"
            return _wait(obj, write_status, "CatalogSourceNotReady", msg), None, PENDING_RECHECK
        msg = f"ModelCatalogSource {src_name!r} offers no model {model!r}"
        return _wait(obj, write_status, "CatalogModelNotFound", msg), None, PENDING_RECHECK
    refuse_format(view, src_name, offered)
    frozen = {"digest": offered["digest"], "sizeBytes": int(offered.get("sizeBytes") or 0),
              "revision": str(offered.get("revision") or ""), "key": pin_key(obj),
              "lastSyncedAt": c.now()}
    log.info("catalog import pinned", extra={"model": view.name,
                                             "source": src_name, "digest": frozen["digest"]})
    obj = write_status(obj, {"catalog": frozen, "conditions": [
        c.condition("SourceResolved", True, "Pinned",
                    f"{src_name}/{model} pinned to {frozen['digest']}")]})
    return obj, src, None


def refuse_format(view: ModelView, src_name: str, offered: dict[str, Any]) -> None:
    """A declared ``spec.format`` the listing says the artifact is not: refused before the
    pin, as a publish refuses files of another format (``FormatMismatch``). A listing
    without a format pins; the import Job checks the artifact's own config then."""
    declared = str(view.spec.get("format") or "Auto")
    listed = str(offered.get("format") or "")
    if declared != "Auto" and listed and listed != declared:
        raise PermanentError(f"spec.format is {declared}, but {src_name}/{offered['name']} "
                             f"({offered['digest']}) is {listed}", reason="FormatMismatch")


def _wait(obj: dict[str, Any], write_status: Callable[[dict[str, Any], dict[str, Any]],
          dict[str, Any]], reason: str, message: str) -> dict[str, Any]:
    conds = [c.condition("SourceResolved", False, reason, message)]
    patch: dict[str, Any] = {"conditions": conds}
    if ModelView.of(obj).phase not in (c.READY, c.PUBLISHING):
        patch["phase"] = c.PENDING  # a model serving an artifact keeps serving it
        conds.append(ready_condition(ModelView.of(obj), reason, message))
    return write_status(obj, patch)
