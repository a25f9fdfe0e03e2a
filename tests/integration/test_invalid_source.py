"""The reconciler's own refusal of a spec the CRD let through: Failed, InvalidSource, one event.

Every ``PermanentError`` of ``publishjob.plan`` has its twin in the CRD schemas (an
empty repo, two sources, a catalog import on a Model…) but one: a catalog import whose
ModelCatalogSource's ``caBundle`` is valid base64, as the schema's ``format: byte``
asks, of bytes that are not PEM text. The real API server admits it; the reconciler
runs in-process (no catalog controller lists the source: its listing is written here,
as in test_update_schedule.py's catalog test) and refuses it on every pass: phase
Failed, SourceResolved and Ready False with reason ``InvalidSource``, no Job, and one
Warning event however many passes run.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import pytest

from api import conditions
from controller.errors import PermanentError
from controller.metrics import Metrics
from controller.models import publishjob as jobs
from controller.models.reconciler import Reconciler, secret_transform
from kube import client as k
from kube.events import Recorder
from kube.informer import Informer
from tests import kubeenv
from tests.integration.test_controller import cond, wait_for
from tests.integration.test_crds import install_crds

kube = kubeenv.kube


def test_planning_refusal_is_failed_with_one_warning(kube: kubeenv.KubeEnv) -> None:
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    src, name = f"cat-{uuid.uuid4().hex[:6]}", f"bad-ca-{uuid.uuid4().hex[:6]}"
    client.create(k.MODEL_CATALOG_SOURCES, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelCatalogSource",
        "metadata": {"name": src}, "spec": {
            "url": "https://catalog.invalid",
            "caBundle": base64.b64encode(b"\xff\xfe not PEM \x80").decode()}})
    client.patch(k.MODEL_CATALOG_SOURCES, src, {"status": {
        "models": [{"name": "llama", "digest": "sha256:" + "1" * 64}]}}, sub="status")
    cm = client.create(k.CLUSTER_MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
        "metadata": {"name": name},
        "spec": {"source": {"catalog": {"sourceRef": src, "model": "llama"}}}})
    uid = cm["metadata"]["uid"]
    settings = jobs.Settings(namespace="modelcache-system", registry="127.0.0.1:1")
    infs = {r: Informer(client, r) for r in (k.CLUSTER_MODELS, k.MODEL_CATALOG_SOURCES,
                                             k.MODELS, k.JOBS)}
    infs[k.SECRETS] = Informer(client, k.SECRETS, transform=secret_transform)
    recorder = Recorder(client)
    for i in infs.values():
        i.start()
    recorder.start()
    try:
        for i in infs.values():
            assert i.synced.wait(30), i.res.plural
        rec = Reconciler(client, settings, models=infs[k.MODELS],
                         cluster_models=infs[k.CLUSTER_MODELS], job_cache=infs[k.JOBS],
                         secrets=infs[k.SECRETS], recorder=recorder, metrics=Metrics(),
                         registry=lambda: None,  # type: ignore[arg-type,return-value]
                         catalog_sources=infs[k.MODEL_CATALOG_SOURCES])
        wait_for(lambda: (infs[k.MODEL_CATALOG_SOURCES].get(("", src)) or {}).get("status"),
                 10, what="the listing in the cache")
        wait_for(lambda: infs[k.CLUSTER_MODELS].get(("", name)), 10, what="the ClusterModel")
        for _ in range(3):  # the work queue would not retry; a watch event would pass again
            with pytest.raises(PermanentError) as e:
                rec.reconcile("ClusterModel", "", name)
            assert e.value.reason == "InvalidSource"
        m = client.get(k.CLUSTER_MODELS, name)
        st: dict[str, Any] = m["status"]
        assert st["phase"] == conditions.FAILED, st
        for type_ in ("SourceResolved", "Ready"):
            c = cond(m, type_)
            assert (c["status"], c["reason"]) == ("False", "InvalidSource"), c
            assert "caBundle" in c["message"]
        assert "artifact" not in st
        assert client.list(k.JOBS, settings.namespace,
                           label_selector=f"modelcache.io/uid={uid}")[0] == []
        recorder.stop()  # flushes what was queued
        time.sleep(0.2)
        events = [(e["type"], e["reason"], e.get("count", 1)) for e in client.list(
            k.EVENTS, None, field_selector=f"involvedObject.uid={uid}")[0]]
        assert events == [("Warning", "InvalidSource", 1)], events
    finally:
        recorder.stop()
        for i in infs.values():
            i.stop()
        client.patch(k.CLUSTER_MODELS, name, {"metadata": {"finalizers": None}})
        client.delete(k.CLUSTER_MODELS, name)
        client.delete(k.MODEL_CATALOG_SOURCES, src)
        client.close()
