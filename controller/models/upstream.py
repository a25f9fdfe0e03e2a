"""Upstream probes: what a model's source resolves to *now*, by one cheap metadata call.

Pipeline position: ``Reconciler.check_upstream`` asks ``Prober.probe`` when
the schedule (``schedule.py``) says a Ready (or Failed-after-a-move) model
is due. The probe runs in the manager, on a small thread pool with an
overall deadline, and downloads nothing. Its answer is compared
(``moved``) with ``status.source.resolvedRevision``, which the publish
worker's ``resolve()`` wrote, so the probe opens the very source URI the
publish Job is given (``publishjob.plan``) and asks that source for its
``latest()`` revision: the string its ``resolve()`` pins, from one
metadata call (each source says how: a Hub commit sha, an Ollama tag's
manifest digest, an HTTP ETag or Last-Modified, an S3 listing digest; a
pinned commit or sha256 never moves and is not asked).

A catalog import is the exception: its probe reads the digest the
ModelCatalogSource's last listing offers for the model (its
``status.models``; no call at all), the listing the import was pinned
from. A move re-pins the import (``status.catalog`` is cleared so the next
pass pins the listed digest): catalog imports follow the remote only when
the user asked for it with ``updatePolicy.schedule``. Upload and pvc
sources have no upstream; the CRD refuses a schedule on them.

Credentials come from the Secret the publish Job would get (``jobs.plan``'s
``SecretUse``), read when the probe runs, passed as arguments and never
logged. Errors are the sources' own ``SourceError`` hierarchy, with the
retry decision.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import logging
from typing import Any, Protocol

from api import conditions as c
from api import model, names
from api.model import ModelView
from controller.models import publishjob as jobs
from controller.models import schedule
from ingest.sources import base, httpio, netpolicy, open_source
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer

log = logging.getLogger(__name__)

PROBED = ("huggingFace", "ollama", "http", "s3", "catalog")
NO_UPSTREAM = ("upload", "pvc")
TIMEOUT = 30.0  # seconds for a whole probe, retries included


def source_kind(obj: dict[str, Any]) -> str | None:
    source = (obj.get("spec") or {}).get("source") or {}
    kinds = [k for k, v in source.items() if v is not None]
    return kinds[0] if len(kinds) == 1 else None


def _revisions(obj: dict[str, Any]) -> tuple[str, str]:
    """(the revision the artifact was published from, the one last asked for)."""
    view = ModelView.of(obj)
    return view.resolved_revision, str(view.annotations.get(names.UPSTREAM) or "")


def applies(obj: dict[str, Any]) -> bool:
    """Whether the model has an upstream to probe and something to compare it with: it
    was published once (an artifact), or a move was asked for. A model that failed its
    first publish has neither: its failure was not a move."""
    if source_kind(obj) not in PROBED:
        return False
    return bool(ModelView.of(obj).digest) or any(_revisions(obj))


def moved(obj: dict[str, Any], latest: str | None) -> bool:
    """Whether ``latest`` asks for a publish: it is neither the revision the artifact was
    published from nor one already asked for (``names.UPSTREAM``), whose publish may
    have failed or resolved a newer revision: asking again would change nothing."""
    return bool(latest) and latest not in _revisions(obj)


def secret_values(client: kube.Kube, use: jobs.SecretUse) -> dict[str, str]:
    """The source Secret as the publish Job's environment would see it (env var → value)."""
    try:
        secret = client.get(kube.SECRETS, use.name, use.namespace)
    except kube.NotFound as e:
        raise base.SourceAuthError(f"Secret {use.namespace}/{use.name} not found",
                                   reason="SecretNotFound") from e
    data = secret.get("data") or {}
    out: dict[str, str] = {}
    for env, key in use.keys.items():
        if data.get(key):
            out[env] = base64.b64decode(data[key]).decode().strip()
        elif env not in use.optional:
            raise base.SourceAuthError(f"Secret {use.namespace}/{use.name} has no key {key!r}",
                                       reason="SecretKeyNotFound")
    return out


class Prober:
    """Runs probes on a few manager threads, each under an overall deadline."""

    def __init__(self, timeout: float = TIMEOUT, workers: int = 4) -> None:
        self.timeout = timeout
        self._pool = cf.ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="upstream-probe")

    def probe(self, obj: dict[str, Any], settings: jobs.Settings, creds: dict[str, str],
              catalog_sources: Informer | None = None) -> base.Latest:
        future = self._pool.submit(probe, obj, settings, creds, catalog_sources, self.timeout)
        try:
            return future.result(timeout=self.timeout)
        except cf.TimeoutError as e:
            # the thread ends on its own: every call in it has a socket timeout
            raise base.SourceUnavailable(f"no answer within {self.timeout:g}s",
                                         reason="UpstreamTimeout") from e

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def probe(obj: dict[str, Any], settings: jobs.Settings, creds: dict[str, str],
          catalog_sources: Informer | None = None, timeout: float = TIMEOUT) -> base.Latest:
    """One probe, in the calling thread; ``SourceError`` when the upstream cannot answer."""
    kind = source_kind(obj)
    s = ((obj.get("spec") or {}).get("source") or {}).get(kind or "") or {}
    if kind not in PROBED:
        return base.Latest(None, f"a {kind} source has no upstream to check")
    if kind == "catalog":
        return _catalog(s, catalog_sources)
    try:
        # the source address policy's connect guard, for this thread's connections only:
        # the manager itself must still reach the API server (ingest.sources.netpolicy)
        with netpolicy.guarded():
            src = open_source(jobs.plan(obj, settings).uri, **_options(kind, s, settings, creds))
            try:
                if not isinstance(src, base.Tracked):  # every PROBED kind is
                    raise TypeError(f"{src.uri} cannot say its latest revision")
                return src.latest(timeout)
            finally:
                src.close()
    except base.SourceError:
        raise
    except Exception as e:  # a client library's surprise: retry at the next check
        if (denied := netpolicy.denial(e)) is not None:
            raise denied from e
        raise base.SourceError(f"{type(e).__name__}: {httpio.cut(str(e))}",
                               reason="UpstreamCheckFailed", retryable=True) from e


def _options(kind: str, s: dict[str, Any], settings: jobs.Settings,
             creds: dict[str, str]) -> dict[str, Any]:
    """``open_source``'s keywords for the spec's source, credentials from ``creds`` only."""
    if kind == "huggingFace":
        # "" and not None: never the manager's own HF_TOKEN for a model that names no Secret
        return {"token": creds.get("HF_TOKEN", ""), "endpoint": settings.hf_endpoint}
    if kind == "http":
        return {"token": creds.get("MODELCACHE_HTTP_TOKEN"), "sha256": s.get("sha256"),
                "archive": s.get("archive")}
    if kind == "s3":
        return {"endpoint": s.get("endpoint"), "region": s.get("region"),
                "access_key": creds.get("AWS_ACCESS_KEY_ID"),
                "secret_key": creds.get("AWS_SECRET_ACCESS_KEY"),
                "session_token": creds.get("AWS_SESSION_TOKEN")}
    if kind == "ollama":  # as the publish Job pulls: the Secret's token or Basic pair
        out = {"token": creds.get("MODELCACHE_HTTP_TOKEN")}
        if creds.get("MODELCACHE_SOURCE_USERNAME"):
            out.update(username=creds["MODELCACHE_SOURCE_USERNAME"],
                       password=creds.get("MODELCACHE_SOURCE_PASSWORD", ""))
        return out
    return {}


def _catalog(s: dict[str, Any], sources: Informer | None) -> base.Latest:
    name, model = str(s.get("sourceRef") or ""), str(s.get("model") or "")
    src = sources.get(("", name)) if sources is not None else None
    if src is None:
        raise base.SourceNotFound(f"ModelCatalogSource {name!r} not found",
                                  reason="CatalogSourceNotFound")
    status = src.get("status") or {}
    offered = next((m for m in status.get("models") or [] if m.get("name") == model), None)
    if offered is None or not offered.get("digest"):
        return base.Latest(None, f"ModelCatalogSource {name!r} no longer offers {model!r}")
    return base.Latest(str(offered["digest"]),
                             f"listed by ModelCatalogSource {name!r} at {status.get('lastListedAt')}")


# -- the reconcile step ---------------------------------------------------------------

COND = "UpstreamTracked"
RETRY = 300.0  # seconds: a probe that failed transiently is tried again this soon at most


class Host(Protocol):
    """What the upstream check needs of the reconciler."""

    client: kube.Kube
    settings: jobs.Settings
    recorder: Recorder
    scheduler: schedule.Scheduler
    prober: Prober
    catalog_sources: Informer | None

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]: ...

    def res(self, obj: dict[str, Any]) -> kube.Resource: ...

    def ns(self, obj: dict[str, Any]) -> str | None: ...

    def observe(self, obj: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]: ...


def _untrack(host: Host, obj: dict[str, Any], reason: str, message: str) -> None:
    host.write_status(obj, {"upstream": {"nextCheckAt": None}, "conditions": [
        c.condition(COND, False, reason, message)]}, what="upstream")


def ensure_checked(host: Host, obj: dict[str, Any], first: bool = False) -> float | None:
    """``spec.updatePolicy.schedule`` for a published model: probe the upstream when the
    schedule says so and, if it moved, set ``names.UPSTREAM`` (part of the publish key).
    ``first``: just published, plan from now. Seconds until the next look; 0 after a
    move (publish now); None when nothing is scheduled."""
    meta = obj["metadata"]
    key = (model.model_kind(obj), meta.get("namespace") or "", meta["name"])
    text = ((obj.get("spec") or {}).get("updatePolicy") or {}).get("schedule")
    status = obj.get("status") or {}
    tracked = any(x.get("type") == COND and x.get("status") == "True"
                  for x in status.get("conditions") or [])
    if not text:
        host.scheduler.forget(key)
        if tracked:
            _untrack(host, obj, "NotScheduled", "spec.updatePolicy.schedule is not set")
        return None
    try:
        sched = schedule.parse(str(text))
    except schedule.ScheduleError as e:  # the CRD refuses most; only a spec change helps
        host.scheduler.forget(key)
        log.warning("invalid schedule", extra={"model": ModelView.of(obj).full_name, "error": str(e)[:300]})
        _untrack(host, obj, e.reason, str(e))
        return None
    kind = source_kind(obj)
    if kind in NO_UPSTREAM:  # the CRD refuses these too
        _untrack(host, obj, "NoUpstream", f"a {kind} source has no upstream: the schedule "
                                          "is ignored")
        return None
    if not applies(obj):
        return None
    up = status.get("upstream") or {}
    at = host.scheduler.next_check(key, sched, last=schedule.from_rfc3339(up.get("lastCheckedAt")),
                                   reset=first)
    now = host.scheduler.clock()
    if at > now:
        if up.get("nextCheckAt") != schedule.rfc3339(at) or not tracked:
            host.write_status(obj, {"upstream": {"nextCheckAt": schedule.rfc3339(at)},
                                    "conditions": [_tracking(sched, at)]}, what="upstream")
        return at - now
    try:
        use = jobs.plan(obj, host.settings).secret if kind != "catalog" else None
        creds = secret_values(host.client, use) if use is not None else {}
        found = host.prober.probe(obj, host.settings, creds, host.catalog_sources)
    except base.SourceError as e:
        at = host.scheduler.checked(key, sched, retry_in=RETRY if e.retryable else None)
        log.warning("upstream check failed", extra={
            "model": ModelView.of(obj).full_name, "reason": e.reason, "error": httpio.cut(str(e), 300),
            "retryIn": round(at - now, 3)})
        host.write_status(obj, {"upstream": {
            "lastCheckedAt": schedule.rfc3339(now), "nextCheckAt": schedule.rfc3339(at),
            "message": f"the check failed: {httpio.cut(str(e), 900)}"}, "conditions": [
            c.condition(COND, False, e.reason, f"checking the upstream failed: {e}")]},
            what="upstream")
        return at - now
    at = host.scheduler.checked(key, sched)
    latest = found.revision
    is_move = moved(obj, latest)
    if latest is None:
        log.info("upstream not checked", extra={"model": ModelView.of(obj).full_name, "why": found.note})
        message = found.note
    else:
        message = f"moved to {latest}: publishing it" if is_move else "unchanged"
    patch: dict[str, Any] = {"upstream": {
        "lastCheckedAt": schedule.rfc3339(now), "nextCheckAt": schedule.rfc3339(at),
        "message": message[:1000]}, "conditions": [_tracking(sched, at)]}
    if latest is not None:
        patch["upstream"]["revision"] = latest[:255]
    if is_move and kind == "catalog":
        patch["catalog"] = None  # unpinned: the next pass pins the digest listed now
    obj = host.write_status(obj, patch, what="upstream")
    if is_move:
        assert latest is not None
        current = _revisions(obj)[0] or "?"
        log.info("upstream moved", extra={"model": ModelView.of(obj).full_name, "from": current, "to": latest})
        host.recorder.record(obj, "Normal", "UpstreamMoved",
                             f"revision {_short(current)} → {_short(latest)}; publishing again")
        answer = host.client.patch(host.res(obj), meta["name"], {
            "metadata": {"annotations": {names.UPSTREAM: latest}}}, host.ns(obj))
        host.observe(obj, answer)
        return 0.0
    return at - now


def _tracking(sched: schedule.Schedule, at: float) -> dict[str, Any]:
    return c.condition(COND, True, "Scheduled", f"upstream checked on schedule "
                       f"{sched.text!r} (UTC); next check at {schedule.rfc3339(at)}")


def _short(revision: str) -> str:
    """A revision for a message: a commit or digest cut to 12 hex digits, as git does."""
    return revision[:19] if revision.startswith("sha256:") else revision[:12]
