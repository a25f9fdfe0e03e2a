"""Prometheus metrics of the manager, in their own registry (no import-time globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("modelcache_reconcile_total", "Reconciles by kind and result",
                                  ["kind", "result"], registry=r)
        self.reconcile_seconds = Histogram(
            "modelcache_reconcile_duration_seconds", "Time per reconcile", ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.queue_depth = Gauge("modelcache_workqueue_depth", "Keys waiting", registry=r)
        self.queue_urgent = Gauge("modelcache_workqueue_urgent_depth",
                                  "Keys waiting in the urgent lane (Jobs owed)", registry=r)
        self.queue_adds = Gauge("modelcache_workqueue_adds", "Keys added so far", registry=r)
        self.queue_retries = Gauge("modelcache_workqueue_retries", "Rate-limited requeues",
                                   registry=r)
        self.jobs_created = Counter("modelcache_publish_jobs_created_total",
                                    "Publish Jobs created", ["kind"], registry=r)
        self.publishes = Counter("modelcache_publish_finished_total", "Publishes finished",
                                 ["kind", "result"], registry=r)
        self.publish_bytes = Counter("modelcache_publish_bytes_total",
                                     "Bytes of the artifacts published (ready)", ["kind"],
                                     registry=r)
        for kind in ("Model", "ClusterModel"):  # present at 0, so increase() sees the first
            self.publish_bytes.labels(kind)
            for result in ("ready", "failed"):
                self.publishes.labels(kind, result)
        self.publish_seconds = Histogram(
            "modelcache_publish_duration_seconds", "Publish Job start to completion, succeeded",
            ["kind"], buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
            registry=r)
        self.validations = Counter("modelcache_validation_total",
                                   "Validation Jobs finished (spec.validation), by result "
                                   "(passed, failed, timeout)", ["result"], registry=r)
        for result in ("passed", "failed", "timeout"):
            self.validations.labels(result)
        self.validation_seconds = Histogram(
            "modelcache_validation_duration_seconds", "Validation Job start to finish",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.artifacts_deleted = Counter("modelcache_artifacts_deleted_total",
                                         "Manifests deleted from the registry", registry=r)
        self.progress_reports = Counter("modelcache_progress_reports_total",
                                        "Progress reports from publish workers", ["result"],
                                        registry=r)
        self.status_patches = Counter("modelcache_status_patches_total", "Status writes",
                                      ["what"], registry=r)
        self.shared_pvcs = Counter("modelcache_shared_pvc_events_total",
                                   "SharedPVC delivery: PVCs created/materialized/deleted, "
                                   "materializer Jobs created/failed", ["event"], registry=r)
        self.admissions = Counter("modelcache_webhook_admissions_total",
                                  "Admission reviews by kind, operation and result "
                                  "(allowed, mutated, denied, error)",
                                  ["kind", "operation", "result"], registry=r)
        self.admission_seconds = Histogram(
            "modelcache_webhook_admission_duration_seconds", "Time to answer one admission",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2), registry=r)
        self.gates_lifted = Counter("modelcache_scheduling_gates_lifted_total",
                                    "Pods whose modelcache scheduling gate was lifted", registry=r)
        self.gated_pods = Gauge("modelcache_scheduling_gated_pods",
                                "Pods held by the modelcache scheduling gate now", registry=r)
        self.gate_oldest = Gauge("modelcache_scheduling_gate_oldest_seconds",
                                 "Age of the oldest pod still held by the gate (0: none)",
                                 registry=r)
        self.leader = Gauge("modelcache_leader", "1 while this replica leads", registry=r)
        self.cached = Gauge("modelcache_cached_objects", "Objects in informer caches",
                            ["resource"], registry=r)
