"""The SharedPVC materializer Job: made, read, retried and cleaned up for one claim.

Where it sits: ``sharedpvc.py`` decides *that* a claim needs filling (it is
in use and not yet annotated ``ANN_PVC_MATERIALIZED``) and calls
``Materializer.ensure``; this module owns the Job that fills it, which runs
``modelcache-controller materialize`` (``jobs/materialize.py``) in the
claim's namespace with the PVC mounted read-write at ``MOUNT``.

``ensure``: the one Job (``contract.materializer_job_name``) absent → create
it (after the retry time a failure set, if any); Complete → annotate the PVC
``ANN_PVC_MATERIALIZED`` and drop the pull credential's copy; Failed → a
Warning Event with the materializer's reason (read by the Job result
protocol, ``api/jobresult.py``), counted once per Job in the PVC's
annotations (so a restarted manager keeps the count), then, after a backoff
that doubles per failure up to ``retry_max``, delete the Job so the next
pass makes it again.

The pull credential, next to the Job as ``<claim>-pull``, owned by the PVC:
with the DMCR's token realm (``ticket_secret``, ``controller/registrytokens.py``)
username ``materializer`` and a ticket that opens only the reference's
repository, for ``TICKET_TTL`` (made afresh with each Job, so a Job recreated
after a failure gets a new one); without it, the two keys of
``--registry-pull-secret`` copied (a pull-only account that reads every
repository). Plus the DMCR's CA bundle when it serves TLS, and the registry
mirrors the manager was given (``--registry-mirror``, ``--registry-hosts-dir``,
as the node plugin takes them): the mirrors of the DMCR's host as
``registry-hosts.toml`` (``mirrors.to_hosts_toml``; a Secret, as a mirror's
``header`` may hold its credentials) with each ``ca``/``client`` file beside
it, which the Job reads with ``--registry-hosts-file``.
"""

from __future__ import annotations

import base64
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from api import jobresult
from api import names as contract
from controller import dmcrtls, jobspec, registrytokens
from controller.metrics import Metrics
from controller.models import publishjob as jobs
from controller.models.reconciler import job_transform
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer
from modelpack.oci import mirrors
from modelpack.oci import reference as ref

log = logging.getLogger(__name__)

MOUNT = "/var/lib/modelcache/pvc"  # where the materializer sees the PVC
CONTAINER = "materialize"
TICKET_TTL = registrytokens.MAX_TICKET_TTL  # a materializer's ticket: one hour at most
MIRRORS_KEY = "registry-hosts.toml"  # the Job Secret's key with the DMCR's mirrors

Obj = dict[str, Any]


def labels(claim: str) -> dict[str, str]:
    """Labels of everything made for ``claim``: the PVC, its Job, its credential copy."""
    return {contract.LABEL_PVC: "true", contract.LABEL_MANAGED: contract.MANAGER,
            "app.kubernetes.io/component": CONTAINER, contract.LABEL_CLAIM: claim}


def pull_secret_name(claim: str) -> str:
    return f"{claim}-pull"


def owned_by(pvc: Obj) -> list[Obj]:
    # not blockOwnerDeletion: that would need update on persistentvolumeclaims/finalizers
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "name": pvc["metadata"]["name"], "uid": pvc["metadata"]["uid"]}]


def ts(t: float) -> str:
    """An annotation's timestamp (RFC 3339, seconds, UTC)."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def mirrors_of(settings: jobs.Settings, reference: str) -> tuple[mirrors.Mirror, ...]:
    """The mirrors a materializer of ``reference`` asks: keyed by the host Models name
    (``settings.registry``) as the node plugin's are, else by the reference's own host."""
    config = settings.registry_mirrors
    if not config:
        return ()
    return config.of(settings.registry) or config.of(reference.split("/", 1)[0])


def mirror_files(listed: tuple[mirrors.Mirror, ...]) -> dict[str, bytes]:
    """The Job Secret's keys that carry ``listed``: the hosts.toml and each file it names
    (none when no mirror is listed)."""
    files: dict[str, bytes] = {}
    if not listed:
        return files
    keys: dict[str, str] = {}

    def relocate(path: str) -> str:
        if path not in keys:
            keys[path] = f"registry-mirror-{len(keys)}"
            with open(path, "rb") as f:
                files[keys[path]] = f.read()
        return jobspec.path(keys[path])

    files[MIRRORS_KEY] = mirrors.to_hosts_toml(listed, relocate).encode()
    return files


def build_job(pvc: Obj, digest: str, reference: str, settings: jobs.Settings,
              with_pull_secret: bool) -> Obj:
    """The materializer Job: the PVC mounted read-write, ``modelcache-controller materialize``.

    A terminal exit (a corrupt blob, a missing manifest) fails the Job at once;
    ``Materializer``'s own, slower backoff takes over from there."""
    meta = pvc["metadata"]
    ns, claim = str(meta["namespace"]), str(meta["name"])
    cmd = ["modelcache-controller", "materialize", "--reference", reference, "--dest", MOUNT,
           "--digest", digest, "--result-file", jobresult.TERMINATION_LOG]
    if settings.registry_insecure:
        cmd.append("--insecure")
    if with_pull_secret and mirrors_of(settings, reference):
        cmd += ["--registry-hosts-file", jobspec.path(MIRRORS_KEY)]
    # the pull credential (and the DMCR's CA) as files of its Secret, never an env value
    # (jobspec.SecretFiles)
    keys = jobspec.REGISTRY_LOGIN + ((jobspec.REGISTRY_CA,) if settings.registry_ca else ())
    secret = jobspec.SecretFiles(pull_secret_name(claim), keys) if with_pull_secret else None
    return jobspec.build(
        name=contract.materializer_job_name(ns, digest), namespace=ns, labels=labels(claim),
        annotations={contract.ANN_PVC_DIGEST: digest}, owners=owned_by(pvc),
        container=CONTAINER, image=settings.image, command=cmd, env=[], secret=secret,
        mounts=[{"name": "pvc", "mountPath": MOUNT}],
        volumes=[{"name": "pvc", "persistentVolumeClaim": {"claimName": claim}}],
        backoff_limit=settings.backoff_limit)


class Materializer:
    """The Job half of SharedPVC delivery (see the module doc); ``annotate`` patches a PVC's
    annotations and returns it as cached (``SharedPVC.annotate``)."""

    def __init__(self, client: kube.Kube, settings: jobs.Settings, *, jobs_cache: Informer,
                 recorder: Recorder, metrics: Metrics,
                 annotate: Callable[[Obj, dict[str, Any]], Obj], pull_secret: str | None,
                 retry_base: float, retry_max: float, ticket_secret: str | None = None) -> None:
        self.client = client
        self.settings = settings
        self.jobs = jobs_cache
        self.recorder = recorder
        self.metrics = metrics
        self.annotate = annotate
        self.pull_secret = pull_secret  # Secret (username/password) in the controller namespace
        self.ticket_secret = ticket_secret  # the token realm's keys (registrytokens.py)
        self.retry_base = retry_base
        self.retry_max = retry_max

    def ensure(self, pvc: Obj, digest: str, reference: str) -> float | None:
        """Ensure ``pvc`` gets filled with ``digest``; seconds until the next look, if any."""
        ns, claim = pvc["metadata"]["namespace"], pvc["metadata"]["name"]
        name = contract.materializer_job_name(ns, digest)
        job = self.jobs.get((ns, name))
        if job is not None and job["metadata"].get("deletionTimestamp"):
            return 1.0
        if job is None:
            ann = pvc["metadata"].get("annotations") or {}
            retry_at = parse_ts(ann.get(contract.ANN_RETRY_AT))
            if retry_at is not None and retry_at > time.time():
                return retry_at - time.time()
            self.create_job(pvc, digest, reference)
            return None
        state = jobresult.state(job)
        if state == jobresult.ACTIVE:
            return None
        if state == jobresult.COMPLETE:
            self.annotate(pvc, {contract.ANN_PVC_MATERIALIZED: digest, contract.ANN_FAILURES: None,
                                contract.ANN_FAILED_JOB: None, contract.ANN_RETRY_AT: None})
            self.delete_pull_secret(ns, claim)
            self.metrics.shared_pvcs.labels("materialized").inc()
            self.recorder.record(pvc, "Normal", "Materialized",
                                 f"{reference} is on the volume (Job {name})")
            log.info("shared pvc materialized", extra={"pvc": f"{ns}/{claim}", "digest": digest})
            return None
        return self.on_failed(pvc, job)

    def on_failed(self, pvc: Obj, job: Obj) -> float:
        """Count a failed Job once, with an Event; after the backoff, delete it to retry."""
        ann = pvc["metadata"].get("annotations") or {}
        uid = str(job["metadata"].get("uid") or "")
        if ann.get(contract.ANN_FAILED_JOB) != uid:
            failures = int(ann.get(contract.ANN_FAILURES) or 0) + 1
            delay = float(min(self.retry_base * 2 ** (failures - 1), self.retry_max))
            outcome = self.outcome(job)
            self.annotate(pvc, {contract.ANN_FAILURES: str(failures), contract.ANN_FAILED_JOB: uid,
                                contract.ANN_RETRY_AT: ts(time.time() + delay)})
            self.metrics.shared_pvcs.labels("failed").inc()
            self.recorder.record(pvc, "Warning", "MaterializeFailed",
                                 f"Job {job['metadata']['name']} failed ({outcome.reason}): "
                                 f"{outcome.message[:600]}; retry {failures} in {delay:.0f}s")
            log.info("materializer failed", extra={
                "pvc": f"{pvc['metadata']['namespace']}/{pvc['metadata']['name']}",
                "reason": outcome.reason, "failures": failures, "retryIn": delay})
            return delay
        retry_at = parse_ts(ann.get(contract.ANN_RETRY_AT)) or 0.0
        if retry_at > time.time():
            return retry_at - time.time()
        self.client.delete(kube.JOBS, job["metadata"]["name"], job["metadata"]["namespace"])
        return 1.0  # the Job's DELETED event brings the key back sooner

    def outcome(self, job: Obj) -> jobresult.Outcome:
        """The Job's outcome; without its pods (a list that failed), from its conditions."""
        try:
            pods, _ = self.client.list(kube.PODS, job["metadata"]["namespace"],
                                       label_selector=jobresult.pod_selector(job))
        except kube.ApiError:
            pods = []
        return jobresult.read(job, pods)

    def create_job(self, pvc: Obj, digest: str, reference: str) -> None:
        ns, claim = pvc["metadata"]["namespace"], pvc["metadata"]["name"]
        with_secret = self.ensure_pull_secret(pvc, reference)
        body = build_job(pvc, digest, reference, self.settings, with_secret)
        try:
            answer = self.client.create(kube.JOBS, body, ns)
            self.metrics.shared_pvcs.labels("job_created").inc()
            log.info("materializer job created", extra={
                "pvc": f"{ns}/{claim}", "job": body["metadata"]["name"], "reference": reference})
        except kube.Conflict:
            answer = self.client.get(kube.JOBS, body["metadata"]["name"], ns)
        self.jobs.observe(job_transform(answer))

    def has_secret(self, reference: str | None = None) -> bool:
        """Whether a Job (of ``reference``; None: of any) gets a Secret next to it."""
        listed = mirrors_of(self.settings, reference) if reference else \
            bool(self.settings.registry_mirrors)
        return bool(self.pull_secret or self.ticket_secret or self.settings.registry_ca
                    or listed)

    def ensure_pull_secret(self, pvc: Obj, reference: str) -> bool:
        """Copy the pull-only credential's two keys (and the DMCR's CA bundle, when the
        registry is served over TLS, and its mirrors) next to the Job; False if none."""
        if not self.has_secret(reference):
            return False
        ns, claim = pvc["metadata"]["namespace"], pvc["metadata"]["name"]
        data: dict[str, str] = {}
        if self.ticket_secret:
            keys = registrytokens.ensure_keys(self.client, self.settings.namespace,
                                              self.ticket_secret)
            ticket = registrytokens.make_ticket(
                keys.ticket_key, ns, ref.parse(reference).repository, time.time() + TICKET_TTL)
            data = {"username": base64.b64encode(registrytokens.MATERIALIZER.encode()).decode(),
                    "password": base64.b64encode(ticket.encode()).decode()}
        elif self.pull_secret:
            source = self.client.get(kube.SECRETS, self.pull_secret, self.settings.namespace)
            data = {k: v for k, v in (source.get("data") or {}).items()
                    if k in ("username", "password")}
        ca = dmcrtls.read_ca(self.settings.registry_ca)
        if ca:
            data[jobspec.REGISTRY_CA[1]] = base64.b64encode(ca).decode()
        for key, raw in mirror_files(mirrors_of(self.settings, reference)).items():
            data[key] = base64.b64encode(raw).decode()
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": pull_secret_name(claim), "namespace": ns,
                             "labels": labels(claim), "ownerReferences": owned_by(pvc)},
                "data": data}
        try:
            self.client.create(kube.SECRETS, body, ns)
        except kube.Conflict:
            self.client.patch(kube.SECRETS, pull_secret_name(claim), {"data": data}, ns)
        return True

    def delete_pull_secret(self, namespace: str, claim: str) -> None:
        if self.has_secret():
            self.client.delete(kube.SECRETS, pull_secret_name(claim), namespace,
                               propagation=None)


__all__ = ["MIRRORS_KEY", "MOUNT", "Materializer", "build_job", "labels", "mirror_files",
           "mirrors_of", "parse_ts",
           "pull_secret_name", "ts"]
