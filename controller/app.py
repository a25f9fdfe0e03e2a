"""The manager process: informers, a work queue, workers, leader election, HTTP.

Start-up order: the HTTP server (health, metrics, reports) and the informers
start at once (a standby replica keeps warm caches and serves reports); the
workers start when this replica holds the Lease and the caches have synced.
Losing the Lease stops the process (exit 1; the Deployment restarts it), the
simplest way to be sure two leaders never reconcile at once.
"""

from __future__ import annotations

import logging
import os
import secrets as pysecrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from api import names as delivery_contract
from controller import dmcrtls, registrytokens
from controller.catalog import server as catalog_server
from controller.catalog import sources as catalogsources
from controller.delivery import gates as delivery_gates
from controller.delivery import sharedpvc
from controller.delivery import webhook as delivery_webhook
from controller.errors import PermanentError, TemporaryError
from controller.metrics import Metrics
from controller.models import credentials, pvcsource
from controller.models import publishjob as jobs
from controller.models.reconciler import Reconciler, job_transform
from controller.models.report import Progress, create_server
from controller.models.secretreader import SecretReader, secret_transform
from controller.upload import client as uploads
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer
from kube.leader import LeaderElector
from kube.workqueue import ShutDown, WorkQueue
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    settings: jobs.Settings
    kubeconfig: str | None = None
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    workers: int = 8
    leader_elect: bool = True
    lease_name: str = "modelcache-controller"
    lease_duration: float = 15.0
    lease_renew: float = 5.0
    identity: str = ""
    registry_username: str | None = None
    registry_password: str | None = None
    progress_interval: float = 1.0
    upload: uploads.Config | None = None  # the upload gateway, for source.upload
    # SharedPVC delivery (controller/delivery/sharedpvc.py); None: not run
    shared_pvc: sharedpvc.Config | None = field(default_factory=sharedpvc.Config)
    # the catalog API (--distribution-mode PublicCatalog); None: not served
    catalog: catalog_server.Config | None = None
    # the admission webhook and the gate lifter (controller/delivery); None: not run
    delivery: delivery_webhook.Config | None = None
    # how often a namespaced Model's Secret (outside --namespace: no watch there, only a
    # get) is read again to re-publish on a change (controller/models/secretreader.py)
    secret_recheck_interval: float = 60.0
    # the DMCR over TLS: its certificate, CA bundle and roll (controller/dmcrtls.py); None:
    # the registry is plain HTTP (the demo) or has a certificate from elsewhere
    registry_tls: dmcrtls.Config | None = None
    # the DMCR pull endpoint's token realm (controller/registrytokens.py), served with
    # registry_tls's certificate; None: not served
    registry_tokens: registrytokens.Config | None = None


class Manager:
    def __init__(self, opts: Options, client: kube.Kube | None = None) -> None:
        self.opts = opts
        self.settings = opts.settings
        # reconcile workers, gate lifts, watches and the rest, each on a kept connection
        lifts = opts.delivery.gate_workers if opts.delivery is not None else 0
        self.client = client or kube.Kube.from_config(opts.kubeconfig,
                                                      pool_size=opts.workers + lifts + 16)
        self.metrics = Metrics()
        self.queue = WorkQueue(name="models")
        s = self.settings
        self.models = Informer(self.client, kube.MODELS)
        self.cluster_models = Informer(self.client, kube.CLUSTER_MODELS)
        self.jobs = Informer(self.client, kube.JOBS, namespace=s.namespace,
                             label_selector=f"{delivery_contract.LABEL_MANAGED}={delivery_contract.MANAGER}",
                             transform=job_transform)
        # Secrets: a watch of the own namespace only; elsewhere a get per Secret a Model
        # names, re-checked every secret_recheck_interval (no cluster-wide list/watch)
        self.secrets = Informer(self.client, kube.SECRETS, namespace=s.namespace,
                                transform=secret_transform)
        self.secret_reader = SecretReader(self.client, s.namespace, self.secrets)
        self.informers = [self.models, self.cluster_models, self.jobs, self.secrets]
        # source.pvc reader Jobs, in the Models' namespaces (pvcsource.py); they use the gateway
        self.pvc_readers = Informer(self.client, kube.JOBS, label_selector=pvcsource.SELECTOR,
                                    transform=job_transform) if opts.upload else None
        if self.pvc_readers is not None:
            self.informers.append(self.pvc_readers)
        self.recorder = Recorder(self.client)
        self.shared_pvc = sharedpvc.SharedPVC(
            self.client, s, opts.shared_pvc, models=self.models,
            cluster_models=self.cluster_models, recorder=self.recorder,
            metrics=self.metrics) if opts.shared_pvc is not None else None
        if self.shared_pvc is not None:
            self.informers += self.shared_pvc.informers
        self.registry_tls = dmcrtls.RegistryTLS(self.client, opts.registry_tls) \
            if opts.registry_tls is not None else None
        self.token_realm = registrytokens.Realm(self.client, opts.registry_tokens) \
            if opts.registry_tokens is not None and self.registry_tls is not None else None
        if self.token_realm is not None and self.registry_tls is not None:
            self.registry_tls.listeners.append(self.token_realm.reload)
        # publish Jobs' source credentials, lent at start (models/credentials.py): on the
        # realm's HTTPS listener; on the plain one only without a realm (demo, tests)
        self.lender = credentials.Lender(self.client, s, {"Model": self.models,
                                                          "ClusterModel": self.cluster_models})
        if self.token_realm is not None:
            self.token_realm.lender = self.lender.serve
        self.delivery: delivery_webhook.Delivery | None = None
        if opts.delivery is not None:
            # nodes as their cache labels; only pods still held by our scheduling gate
            self.nodes = Informer(self.client, kube.NODES, transform=delivery_gates.node_transform)
            self.gated_pods = Informer(
                self.client, kube.PODS, label_selector=f"{delivery_contract.LABEL_GATED}=true",
                transform=delivery_gates.pod_transform)
            self.informers += [self.nodes, self.gated_pods]
            self.delivery = delivery_webhook.Delivery(
                self.client, opts.delivery, s.namespace, models=self.models,
                cluster_models=self.cluster_models, pods=self.gated_pods, nodes=self.nodes,
                pvcs=self.shared_pvc.pvcs if self.shared_pvc is not None else None,
                recorder=self.recorder, metrics=self.metrics)
        # ModelCatalogSources: listed by their own controller, read by catalog imports
        self.catalog_sources = Informer(self.client, kube.MODEL_CATALOG_SOURCES)
        self.informers.append(self.catalog_sources)
        self.catalog_controller = catalogsources.Controller(
            self.client, s.namespace, self.catalog_sources, self.secrets,
            on_listed=self._on_catalog_source)
        self.reconciler = Reconciler(self.client, s, models=self.models,
                                     cluster_models=self.cluster_models, job_cache=self.jobs,
                                     secrets=self.secret_reader, recorder=self.recorder,
                                     metrics=self.metrics, registry=self._registry,
                                     upload_gateway=uploads.Gateway(opts.upload)
                                     if opts.upload else None,
                                     catalog_sources=self.catalog_sources)
        self.catalog_server = catalog_server.build(
            opts.catalog, self.client, self.cluster_models, self._registry) \
            if opts.catalog is not None else None
        self.progress = Progress(self.client, self.models, self.cluster_models, self.metrics,
                                 opts.progress_interval)
        self.identity = opts.identity or f"{socket.gethostname()}_{pysecrets.token_hex(4)}"
        self.elector = LeaderElector(self.client, s.namespace, opts.lease_name, self.identity,
                                     lease_duration=opts.lease_duration, renew=opts.lease_renew,
                                     on_lost=self._lost) if opts.leader_elect else None
        self.stopping = threading.Event()
        self.exit_code = 0
        self._workers: list[threading.Thread] = []
        self._wire()
        self.server = create_server(opts.listen, metrics=self.metrics, healthy=self.healthy,
                                    ready=self.ready, job_lookup=self._job,
                                    progress=self.progress, report_key=s.report_key,
                                    lender=self.lender.serve if self.token_realm is None
                                    else None)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    # -- wiring ---------------------------------------------------------------

    def _registry(self) -> Any:
        return RegistryClient(self.settings.registry, insecure=self.settings.registry_insecure,
                              ca_bundle=self.settings.registry_ca,
                              username=self.opts.registry_username,
                              password=self.opts.registry_password)

    def _on_catalog_source(self, name: str) -> None:
        """A source listed (or changed): its imports still waiting for a pin look again."""
        for m in self.cluster_models.items():
            ref = (((m.get("spec") or {}).get("source") or {}).get("catalog") or {})
            if ref.get("sourceRef") == name:
                self.queue.add(("ClusterModel", "", m["metadata"]["name"]))

    def _job(self, name: str) -> dict[str, Any] | None:
        job = self.jobs.get((self.settings.namespace, name))
        if job is None and self.pvc_readers is not None:
            job = pvcsource.find(self.pvc_readers, name)  # a reader reporting its upload
        return job

    def _wire(self) -> None:
        def on_model(kind: str) -> Any:
            def handler(event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
                meta = obj["metadata"]
                if event == "DELETED":
                    return
                # status-only changes (our own writes) need no pass, unless they were not ours
                if old is not None and old["metadata"].get("generation") == meta.get("generation") \
                        and old["metadata"].get("annotations") == meta.get("annotations") \
                        and old["metadata"].get("deletionTimestamp") == meta.get("deletionTimestamp") \
                        and old["metadata"].get("finalizers") == meta.get("finalizers") \
                        and event == "MODIFIED":
                    return
                self.queue.add((kind, meta.get("namespace") or "", meta["name"]),
                               urgent=_needs_job(obj, old))
            return handler

        self.models.handlers.append(on_model("Model"))
        self.cluster_models.handlers.append(on_model("ClusterModel"))

        def on_job(event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            lab = obj["metadata"].get("labels") or {}
            if lab.get(delivery_contract.LABEL_NAME):
                self.queue.add((lab.get(delivery_contract.LABEL_KIND, "Model"),
                                lab.get(delivery_contract.LABEL_NAMESPACE, ""), lab[delivery_contract.LABEL_NAME]))

        self.jobs.handlers.append(on_job)
        if self.pvc_readers is not None:
            self.pvc_readers.handlers.append(on_job)

        def on_secret(event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            if old is not None and old.get("hashes") == obj.get("hashes") and event != "DELETED" \
                    and old["metadata"].get("labels") == obj["metadata"].get("labels"):
                return  # a label change may lend the Secret to ClusterModels (secretrefs)
            meta = obj["metadata"]
            ns, name = meta.get("namespace"), meta.get("name")
            for kind, inf in (("Model", self.models), ("ClusterModel", self.cluster_models)):
                for m in inf.items():
                    if _secret_ref(m) == name and (
                            (kind == "Model" and m["metadata"].get("namespace") == ns)
                            or (kind == "ClusterModel" and ns == self.settings.namespace)):
                        self.queue.add((kind, m["metadata"].get("namespace") or "",
                                        m["metadata"]["name"]))

        self.secrets.handlers.append(on_secret)

    def _recheck_secrets(self) -> None:
        """Namespaced Models' Secrets outside the own namespace: no watch, so read
        each again every ``secret_recheck_interval`` and queue the Models whose
        Secret changed (``SecretReader.recheck``)."""
        while not self.stopping.wait(self.opts.secret_recheck_interval):
            try:
                users: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
                for m in self.models.items():
                    name, ns = _secret_ref(m), m["metadata"].get("namespace") or ""
                    if name and ns != self.settings.namespace:
                        users.setdefault((ns, name), []).append(
                            ("Model", ns, m["metadata"]["name"]))
                for key in self.secret_reader.recheck(users):
                    for item in users[key]:
                        self.queue.add(item)
            except Exception as e:  # the next round tries again
                log.warning("secret re-check failed", extra={"error": str(e)[:300]})

    # -- health ---------------------------------------------------------------

    def healthy(self) -> bool:
        return all(i.alive() for i in self.informers) and not self.stopping.is_set()

    def ready(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    # -- workers --------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                key = self.queue.get()
            except ShutDown:
                return
            kind, ns, name = (str(part) for part in key)  # type: ignore[attr-defined]
            t0 = time.monotonic()
            result = "ok"
            try:
                res = self.reconciler.reconcile(kind, ns, name)
                self.queue.forget(key)
                if res.follow_up:
                    self.queue.add(key)  # the normal lane: after the urgent Job creations
                if res.requeue_after:
                    self.queue.add_after(key, res.requeue_after)
            except PermanentError as e:
                result = "permanent"
                self.queue.forget(key)
                log.info("reconcile failed permanently",
                         extra={"kind": kind, "model": f"{ns}/{name}", "reason": e.reason,
                                "error": str(e)[:300]})
            except TemporaryError as e:
                result = "retry"
                if e.delay is not None:
                    self.queue.add_after(key, e.delay)
                else:
                    self.queue.add_rate_limited(key)
                log.info("reconcile will retry", extra={"kind": kind, "model": f"{ns}/{name}",
                                                        "reason": e.reason,
                                                        "error": str(e)[:300]})
            except kube.Conflict as e:
                result = "conflict"  # someone wrote first: look again at once
                self.queue.add_rate_limited(key)
                log.debug("conflict", extra={"model": f"{ns}/{name}", "error": str(e)[:200]})
            except Exception as e:
                result = "error"
                delay = self.queue.add_rate_limited(key)
                log.warning("reconcile error", exc_info=not isinstance(e, kube.ApiError),
                            extra={"kind": kind, "model": f"{ns}/{name}",
                                   "error": str(e)[:300], "retryIn": round(delay, 3)})
            finally:
                self.queue.done(key)
                self.metrics.reconciles.labels(kind, result).inc()
                self.metrics.reconcile_seconds.labels(kind).observe(time.monotonic() - t0)

    def _gauges(self) -> None:
        while not self.stopping.wait(2.0):
            self.metrics.queue_depth.set(len(self.queue))
            self.metrics.queue_urgent.set(self.queue.urgent_len())
            self.metrics.queue_adds.set(self.queue.adds)
            self.metrics.queue_retries.set(self.queue.retries)
            for i in self.informers:
                self.metrics.cached.labels(i.res.plural).set(len(i))
            if self.delivery is not None:
                self.metrics.gated_pods.set(len(self.gated_pods))
                self.metrics.gate_oldest.set(delivery_gates.oldest_held_seconds(
                    self.gated_pods.items(), time.time()))

    # -- lifecycle ------------------------------------------------------------

    def _lost(self) -> None:
        self.exit_code = 1
        self.stop()

    def start(self) -> None:
        if self.registry_tls is not None:  # every replica: the CA file its Jobs are given
            self.registry_tls.start()
            if self.token_realm is not None:  # every replica answers the realm
                self.token_realm.start(self.registry_tls.keeper.ensure())
        threading.Thread(target=self.server.serve_forever, daemon=True, name="http").start()
        if self.catalog_server is not None:  # standbys serve the catalog from warm caches too
            threading.Thread(target=self.catalog_server.serve_forever, daemon=True,
                             name="catalog").start()
        for i in self.informers:
            i.start()
        self.recorder.start()
        if self.delivery is not None:  # every replica answers admissions
            self.delivery.start()
        self.progress.start()
        threading.Thread(target=self._gauges, daemon=True, name="gauges").start()
        if self.elector is not None:
            self.elector.start()
        threading.Thread(target=self._lead, daemon=True, name="lead").start()

    def _lead(self) -> None:
        if self.elector is not None:
            while not self.elector.is_leader.wait(0.5):
                if self.stopping.is_set():
                    return
        self.metrics.leader.set(1)
        for i in self.informers:
            while not i.synced.wait(0.5):
                if self.stopping.is_set():
                    return
        log.info("starting workers", extra={"workers": self.opts.workers,
                                            "identity": self.identity})
        for n in range(self.opts.workers):
            t = threading.Thread(target=self._work, daemon=True, name=f"worker-{n}")
            t.start()
            self._workers.append(t)
        if self.shared_pvc is not None:
            self.shared_pvc.start_workers()
        if self.delivery is not None:
            self.delivery.lead()
        self.catalog_controller.start()
        threading.Thread(target=self._recheck_secrets, daemon=True, name="secret-recheck").start()

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.queue.shutdown()
        if self.registry_tls is not None:
            self.registry_tls.stop()
        if self.token_realm is not None:
            self.token_realm.stop()
        self.catalog_controller.stop()
        if self.shared_pvc is not None:
            self.shared_pvc.stop()
        if self.delivery is not None:
            self.delivery.stop()
        for i in self.informers:
            i.stop()
        self.progress.stop()
        for t in self._workers:
            t.join(10)
        self.recorder.stop()
        if self.elector is not None:
            self.elector.release()
        self.metrics.leader.set(0)
        self.server.shutdown()
        self.server.server_close()
        if self.catalog_server is not None:
            self.catalog_server.shutdown()
            self.catalog_server.server_close()

    def run(self) -> int:
        """Start, wait for SIGTERM/SIGINT (or a lost Lease), stop; the exit status."""
        done = threading.Event()

        def on_signal(signum: int, _: Any) -> None:
            log.info("stopping", extra={"signal": signum})
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        log.info("manager started", extra={"listen": f"{self.opts.listen[0]}:{self.port}",
                                           "namespace": self.settings.namespace,
                                           "registry": self.settings.registry,
                                           "pid": os.getpid()})
        while not done.wait(0.5):
            if self.stopping.is_set():
                break
        self.stop()
        return self.exit_code


def _needs_job(obj: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Whether a watch event likely means "a publish Job is owed": a model never
    published, or a spec/annotation change. Only a queue priority: a wrong guess
    costs order, never correctness."""
    if obj["metadata"].get("deletionTimestamp"):
        return False
    if old is None:
        return not ((obj.get("status") or {}).get("publish") or {}).get("key")
    return bool(old["metadata"].get("generation") != obj["metadata"].get("generation")
                or old["metadata"].get("annotations") != obj["metadata"].get("annotations"))


def _secret_ref(obj: dict[str, Any]) -> str | None:
    source = ((obj.get("spec") or {}).get("source") or {})
    for s in source.values():
        if isinstance(s, dict) and isinstance(s.get("authSecretRef"), dict):
            return str(s["authSecretRef"].get("name") or "") or None
    return None
