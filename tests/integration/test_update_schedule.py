"""``spec.updatePolicy.schedule``: a moved upstream is published again, a still one is not.

The manager runs as a subprocess against the real API server with the HF test hub
(tests/servers/hfhub.py), the Ollama-style registry, versitygw (S3), a loopback file
server and a real registry; the FAKE kubelet runs the publish Jobs (see
tests/integration/test_controller.py). Schedules are ``@every 2s``, so everything
runs on the real clock; cron times are unit-tested on an injected clock
(tests/unit/test_schedule.py). Per source: upstream moved → published again with the
new ``resolvedRevision`` and digest, an ``UpstreamMoved`` event; unchanged → checked
(``status.upstream.lastCheckedAt`` moves) and no new Job. Also: the API server refuses
a garbage schedule, the controller flags one the CRD cannot (``InvalidSchedule``), and
each probe on its own against the real servers: pinned sources ask nothing, an HTTP
server without validators is skipped with a reason, S3's listing digest is the one the
publish pins, a catalog import reads its ModelCatalogSource's listing, a silent server
times out. A catalog import's re-pin runs the reconciler in-process (an import Job needs
another cluster's catalog; tests/integration/test_catalog_import.py has that).
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from api import names
from controller.catalog import sources as catalogsources
from controller.metrics import Metrics
from controller.models import publishjob as jobs
from controller.models import schedule, upstream
from controller.models.reconciler import Reconciler, secret_transform
from ingest.sources import base, open_source
from kube import client as k
from kube.events import Recorder
from kube.informer import Informer
from tests import kubeenv, modelgen
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import (
    cond,
    events_of,
    get_model,
    jobs_of,
    phase_is,
    wait_for,
)
from tests.integration.test_controller import kubelet as kubelet
from tests.integration.test_controller import manager as manager
from tests.integration.test_controller import namespace as namespace
from tests.servers import ollama as ollama_server
from tests.servers import s3 as s3server
from tests.servers.files import FileServer

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube
EVERY = "@every 2s"
HTTP_TOKEN = "http-s3cret-token"


def scheduled(name: str, ns: str, source: dict[str, Any], every: str = EVERY
              ) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"source": source, "updatePolicy": {"schedule": every}}}


def checks(hub: Any, repo: str) -> int:
    """Revision look-ups of ``repo``'s main branch the hub has answered."""
    path = f"/api/models/{repo}/revision/main"
    with hub.lock:
        return sum(1 for method, p, _ in hub.requests if method == "GET" and p == path)


def wait_checks(hub: Any, repo: str, more: int) -> None:
    start = checks(hub, repo)
    wait_for(lambda: checks(hub, repo) >= start + more, 60, interval=0.2,
             what=f"{more} more upstream checks of {repo}")


def wait_ready(client: k.Kube, ns: str, name: str, manager: Any) -> dict[str, Any]:
    m = wait_for(phase_is(client, ns, name, "Ready", "Failed"), 90, what=f"{name} Ready")
    assert m["status"]["phase"] == "Ready", (m["status"], manager.logs())
    return m  # type: ignore[no-any-return]


def wait_checked(client: k.Kube, ns: str, name: str, times: int = 2) -> dict[str, Any]:
    """Wait until ``status.upstream.lastCheckedAt`` has moved ``times`` times."""
    seen: list[str] = []

    def more() -> Any:
        m = get_model(client, ns, name) or {}
        at = ((m.get("status") or {}).get("upstream") or {}).get("lastCheckedAt")
        if at and (not seen or seen[-1] != at):
            seen.append(at)
        return m if len(seen) > times else None
    return wait_for(more, 60, interval=0.2, what=f"{times} more checks of {name}")  # type: ignore[no-any-return]


def wait_republished(client: k.Kube, ns: str, name: str, revision: str) -> dict[str, Any]:
    def done() -> Any:
        m = get_model(client, ns, name) or {}
        st = m.get("status") or {}
        return m if st.get("phase") == "Ready" and \
            (st.get("source") or {}).get("resolvedRevision") == revision else None
    return wait_for(done, 90, what=f"{name} published again from {revision}")  # type: ignore[no-any-return]


def assert_moved(client: k.Kube, ns: str, m: dict[str, Any], old_digest: str, revision: str,
                 jobs_n: int) -> None:
    """Published again from ``revision``: a new digest, the event, one more Job only."""
    uid = m["metadata"]["uid"]
    assert m["status"]["artifact"]["digest"] != old_digest
    assert m["metadata"]["annotations"][names.UPSTREAM] == revision
    assert cond(m, "Ready")["status"] == "True"
    assert len(jobs_of(client, uid)) == jobs_n
    wait_for(lambda: [e for e in events_of(client, ns, uid)
                      if e["reason"] == "UpstreamMoved" and upstream._short(revision) in
                      e["message"]], 10, what="the UpstreamMoved event")


def assert_still(client: k.Kube, ns: str, name: str, jobs_n: int) -> dict[str, Any]:
    """Checked twice more on an unchanged upstream: no new Job, the same publish key."""
    before = get_model(client, ns, name) or {}
    m = wait_checked(client, ns, name, 2)
    assert len(jobs_of(client, m["metadata"]["uid"])) == jobs_n
    assert m["status"]["publish"]["key"] == before["status"]["publish"]["key"]
    assert m["status"]["upstream"]["message"] == "unchanged", m["status"]["upstream"]
    tracked = cond(m, "UpstreamTracked")
    assert tracked["status"] == "True" and tracked["reason"] == "Scheduled", tracked
    assert "(UTC)" in tracked["message"]
    return m


def put_secret(client: k.Kube, ns: str, name: str, data: dict[str, str]) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "data": {key: base64.b64encode(v.encode()).decode() for key, v in data.items()}}
    try:
        client.create(k.SECRETS, body, ns)
    except k.Conflict:
        client.patch(k.SECRETS, name, {"data": body["data"]}, ns)


# --- a catalog import, re-pinned (first in the file: before the module's manager runs) ---


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_moved_catalog_digest_re_pins_the_import(cluster):
    """The reconciler in-process (the manager subprocess is not started yet, so nothing else
    acts on these objects) on an injected clock: the listed digest moves → the pin is
    dropped and re-made from the listing, and the publish key changes (a new import Job)."""
    src_name, name = f"cat-{uuid.uuid4().hex[:6]}", f"imp-{uuid.uuid4().hex[:6]}"
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    cluster.create(k.MODEL_CATALOG_SOURCES, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelCatalogSource",
        "metadata": {"name": src_name}, "spec": {"url": "https://catalog.invalid"}})

    def listing(digest: str) -> None:
        cluster.patch(k.MODEL_CATALOG_SOURCES, src_name, {"status": {
            "models": [{"name": "llama", "digest": digest}],
            "lastListedAt": schedule.rfc3339(time.time())}}, sub="status")
    listing(d1)
    cm = cluster.create(k.CLUSTER_MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
        "metadata": {"name": name},
        "spec": {"source": {"catalog": {"sourceRef": src_name, "model": "llama"}},
                 "updatePolicy": {"schedule": EVERY}}})
    cm["kind"] = "ClusterModel"
    cluster.patch(k.CLUSTER_MODELS, name, {"status": {  # as after its first import
        "phase": "Ready", "source": {"resolvedRevision": d1},
        "artifact": {"digest": "sha256:" + "a" * 64, "sizeBytes": 1},
        "catalog": {"digest": d1, "key": catalogsources.pin_key(cm)},
        "publish": {"key": "first"}}}, sub="status")
    settings = jobs.Settings(namespace="modelcache-system", registry="127.0.0.1:1")
    infs = {r: Informer(cluster, r) for r in (k.CLUSTER_MODELS, k.MODEL_CATALOG_SOURCES,
                                              k.MODELS, k.JOBS)}
    infs[k.SECRETS] = Informer(cluster, k.SECRETS, transform=secret_transform)
    recorder = Recorder(cluster)
    for i in infs.values():
        i.start()
    recorder.start()
    try:
        for i in infs.values():
            wait_for(i.synced.is_set, 30, what="informer synced")
        rec = Reconciler(cluster, settings, models=infs[k.MODELS],
                         cluster_models=infs[k.CLUSTER_MODELS], job_cache=infs[k.JOBS],
                         secrets=infs[k.SECRETS], recorder=recorder, metrics=Metrics(),
                         registry=lambda: None,  # type: ignore[arg-type,return-value]
                         catalog_sources=infs[k.MODEL_CATALOG_SOURCES])
        clock = Clock()
        rec.scheduler = schedule.Scheduler(clock=clock, jitter=(1.0, 1.0), spread=0.0)

        def current() -> dict[str, Any]:
            obj = wait_for(lambda: infs[k.CLUSTER_MODELS].get(("", name)), 10, what=name)
            return dict(obj, kind="ClusterModel")

        wait_for(lambda: (current().get("status") or {}).get("phase") == "Ready", 10,
                 what="the status in the cache")
        assert rec.check_upstream(current()).requeue_after == 2.0  # first sight: planned
        clock.now += 2.0
        assert rec.check_upstream(current()).requeue_after == 2.0  # checked: unchanged
        st = current()["status"]
        assert st["upstream"]["message"] == "unchanged" and st["upstream"]["revision"] == d1
        assert st["catalog"]["digest"] == d1

        listing(d2)  # the remote model was published again
        wait_for(lambda: upstream.probe(current(), settings, {},
                                        infs[k.MODEL_CATALOG_SOURCES]).revision == d2,
                 10, what="the new listing in the cache")
        clock.now += 2.0
        res = rec.check_upstream(current())  # a move: publish now, not at the next check
        assert res.follow_up and res.requeue_after is None
        obj = wait_for(lambda: (lambda o: o if names.UPSTREAM in (
            o["metadata"].get("annotations") or {}) else None)(current()), 10,
            what="the move marked")
        assert obj["metadata"]["annotations"][names.UPSTREAM] == d2
        assert "catalog" not in obj["status"]  # unpinned
        # the next pass pins what the source lists now, and so publishes it
        obj, src, wait = catalogsources.ensure_pin(obj, infs[k.MODEL_CATALOG_SOURCES],
                                                   rec.write_status)
        assert wait is None and src is not None
        assert obj["status"]["catalog"]["digest"] == d2
        plan = jobs.plan(obj, settings, src)
        assert d2 in plan.uri
        assert jobs.publish_key(obj, plan.key_extra) != "first"
        uid = cm["metadata"]["uid"]
        wait_for(lambda: [e for e in cluster.list(k.EVENTS, None, field_selector=(
            f"involvedObject.uid={uid}"))[0] if e["reason"] == "UpstreamMoved"],
            10, what="the UpstreamMoved event")
    finally:
        recorder.stop()
        for i in infs.values():
            i.stop()
        cluster.delete(k.CLUSTER_MODELS, name)
        cluster.delete(k.MODEL_CATALOG_SOURCES, src_name)


# --- Hugging Face ------------------------------------------------------------------------


def test_moved_branch_is_published_again_still_one_is_not(cluster, namespace, manager, hub,
                                                          small_model):
    first = hub.add_repo("acme/sched", small_model)
    cluster.create(k.MODELS, scheduled("sched", namespace, {"huggingFace": {
        "repo": "acme/sched"}}), namespace)
    m = wait_ready(cluster, namespace, "sched", manager)
    uid = m["metadata"]["uid"]
    assert m["status"]["source"]["resolvedRevision"] == first.sha
    digest = m["status"]["artifact"]["digest"]

    # still upstream: checked (the hub sees the look-ups), nothing published again
    wait_checks(hub, "acme/sched", 2)
    m = assert_still(cluster, namespace, "sched", 1)
    assert m["status"]["upstream"]["revision"] == first.sha
    assert names.UPSTREAM not in (m["metadata"].get("annotations") or {})

    # the branch moves to a new commit (one more file): published again from it
    second = hub.add_repo("acme/sched", small_model, files={"README.md": b"# v2\n"})
    assert second.sha != first.sha
    m = wait_republished(cluster, namespace, "sched", second.sha)
    assert_moved(cluster, namespace, m, digest, second.sha, 2)

    # and still again: more checks, no third Job
    wait_checks(hub, "acme/sched", 2)
    assert len(jobs_of(cluster, uid)) == 2


def test_failed_after_a_move_recovers_on_a_later_commit(cluster, namespace, manager, hub,
                                                        small_model):
    hub.add_repo("acme/fixed", small_model)
    cluster.create(k.MODELS, scheduled("fixed", namespace, {"huggingFace": {
        "repo": "acme/fixed"}}), namespace)
    m = wait_ready(cluster, namespace, "fixed", manager)
    uid, digest = m["metadata"]["uid"], m["status"]["artifact"]["digest"]

    # a commit whose weights arrive corrupt: the re-publish fails
    broken = hub.add_repo("acme/fixed", small_model, files={"README.md": b"# broken\n"})
    hub.knobs.corrupt.add("model.safetensors")
    m = wait_for(phase_is(cluster, namespace, "fixed", "Failed"), 90, what="Failed")
    assert cond(m, "Published")["reason"] == "ChecksumMismatch", cond(m, "Published")
    assert cond(m, "Ready")["reason"] == "ServingPreviousArtifact", cond(m, "Ready")
    assert m["status"]["artifact"]["digest"] == digest  # the old artifact stays, served
    assert m["metadata"]["annotations"][names.UPSTREAM] == broken.sha
    # the same broken commit is not asked for again
    wait_checks(hub, "acme/fixed", 2)
    assert len(jobs_of(cluster, uid)) == 2

    # upstream repairs it in a later commit: the schedule still runs, and publishes it
    hub.knobs.corrupt.clear()
    fixed = hub.add_repo("acme/fixed", small_model, files={"README.md": b"# fixed\n"})
    m = wait_for(phase_is(cluster, namespace, "fixed", "Ready"), 90, what="Ready again")
    assert m["status"]["source"]["resolvedRevision"] == fixed.sha
    assert len(jobs_of(cluster, uid)) == 3


# --- Ollama, HTTP, S3 ------------------------------------------------------------------


def test_moved_ollama_tag_is_published_again(cluster, namespace, manager, ollama_registry,
                                             ollama_client, tmp_path):
    modelgen.make_gguf_model(str(tmp_path / "a"), seed=1)
    pushed = ollama_server.push_model(ollama_client, "library/sched", "1b",
                                      str(tmp_path / "a" / "model.gguf"))
    cluster.create(k.MODELS, scheduled("oll", namespace, {"ollama": {
        "model": "library/sched", "tag": "1b", "registry": ollama_registry.host}}), namespace)
    m = wait_ready(cluster, namespace, "oll", manager)
    assert m["status"]["source"]["resolvedRevision"] == pushed["digest"]
    digest = m["status"]["artifact"]["digest"]
    assert_still(cluster, namespace, "oll", 1)

    modelgen.make_gguf_model(str(tmp_path / "b"), seed=2)
    again = ollama_server.push_model(ollama_client, "library/sched", "1b",
                                     str(tmp_path / "b" / "model.gguf"))
    assert again["digest"] != pushed["digest"]
    m = wait_republished(cluster, namespace, "oll", str(again["digest"]))
    assert_moved(cluster, namespace, m, digest, str(again["digest"]), 2)


@pytest.fixture
def files(tmp_path) -> Iterator[FileServer]:
    root = tmp_path / "files"
    root.mkdir()
    with FileServer(str(root), token=HTTP_TOKEN) as fs:
        yield fs


def _etag(fs: FileServer, name: str) -> str:
    import requests

    resp = requests.head(f"{fs.url}/{name}", headers={"Authorization": f"Bearer {HTTP_TOKEN}"},
                         timeout=10)
    return resp.headers["ETag"].strip('"')


def test_changed_http_file_is_published_again(cluster, namespace, manager, files, tmp_path):
    modelgen.make_gguf_model(files.root, seed=3, name="tiny.gguf")
    put_secret(cluster, namespace, "http-token", {"token": HTTP_TOKEN})
    cluster.create(k.MODELS, scheduled("web", namespace, {"http": {
        "url": f"{files.url}/tiny.gguf", "authSecretRef": {"name": "http-token"}}}), namespace)
    m = wait_ready(cluster, namespace, "web", manager)
    assert m["status"]["source"]["resolvedRevision"] == _etag(files, "tiny.gguf")
    digest = m["status"]["artifact"]["digest"]
    assert_still(cluster, namespace, "web", 1)
    with files.lock:  # the probe is a HEAD: nothing was downloaded but by the publish Job
        gets = [r for r in files.requests if r[0] == "GET"]
        heads = [r for r in files.requests if r[0] == "HEAD"]
    assert len(heads) >= 3 and len(gets) == 1, files.requests

    modelgen.make_gguf_model(str(tmp_path / "new"), seed=4, name="tiny.gguf")
    os.replace(tmp_path / "new" / "tiny.gguf", os.path.join(files.root, "tiny.gguf"))
    etag = _etag(files, "tiny.gguf")
    m = wait_republished(cluster, namespace, "web", etag)
    assert_moved(cluster, namespace, m, digest, etag, 2)
    assert HTTP_TOKEN not in manager.logs()


def test_changed_s3_prefix_is_published_again(cluster, namespace, manager, s3, small_model):
    s3c = s3.client()
    bucket = f"sched-{uuid.uuid4().hex[:6]}"
    s3c.create_bucket(Bucket=bucket)
    for n in sorted(os.listdir(small_model)):
        s3c.upload_file(os.path.join(small_model, n), bucket, f"m/{n}")
    put_secret(cluster, namespace, "s3-creds", {"AWS_ACCESS_KEY_ID": s3server.ACCESS_KEY,
                                                "AWS_SECRET_ACCESS_KEY": s3server.SECRET_KEY})
    cluster.create(k.MODELS, scheduled("bucket", namespace, {"s3": {
        "endpoint": s3.endpoint, "region": "us-east-1", "bucket": bucket, "prefix": "m/",
        "authSecretRef": {"name": "s3-creds"}}}), namespace)
    m = wait_ready(cluster, namespace, "bucket", manager)
    digest = m["status"]["artifact"]["digest"]
    assert_still(cluster, namespace, "bucket", 1)

    s3c.put_object(Bucket=bucket, Key="m/README.md", Body=b"# changed\n")
    listing = open_source(f"s3://{bucket}/m/", endpoint=s3.endpoint, region="us-east-1",
                          access_key=s3server.ACCESS_KEY,
                          secret_key=s3server.SECRET_KEY).resolve().revision
    m = wait_republished(cluster, namespace, "bucket", listing)
    assert_moved(cluster, namespace, m, digest, listing, 2)
    assert s3server.SECRET_KEY not in manager.logs()


# --- invalid schedules -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["every day", "0 3 * *", "61 * * * *", "* * * * mon-funday",
                                 "@every 1 day", "@fortnightly", "0 0 * 0 *"])
def test_api_server_refuses_a_garbage_schedule(cluster, namespace, bad):
    body = scheduled(f"bad-{uuid.uuid4().hex[:6]}", namespace, {"huggingFace": {
        "repo": "acme/bad"}}, every=bad)
    with pytest.raises(k.ApiError) as info:
        cluster.create(k.MODELS, body, namespace)
    assert info.value.status == 422
    assert "schedule must be '@every <duration>'" in str(info.value)


def test_api_server_accepts_cron_the_controller_reads(cluster, namespace):
    for good in ("0 3 * * 0", "*/15 9-17 * * MON-FRI", "0 0 1,15 * sun", "@monthly",
                 "@every 1h30m", "0 0 29 feb ?"):
        name = f"good-{uuid.uuid4().hex[:6]}"
        body = scheduled(name, namespace, {"huggingFace": {"repo": "acme/none"}}, every=good)
        answer = cluster.request("POST", k.MODELS.path(namespace), body=body,
                                 query={"dryRun": "All"})
        assert answer["spec"]["updatePolicy"]["schedule"] == good


def test_schedule_past_the_crd_is_flagged_invalid(cluster, namespace, manager, hub,
                                                  small_model):
    """Feb 30 passes the CRD's pattern but never fires: published, not scheduled, said so."""
    hub.add_repo("acme/feb30", small_model)
    cluster.create(k.MODELS, scheduled("feb30", namespace, {"huggingFace": {
        "repo": "acme/feb30"}}, every="0 0 30 2 *"), namespace)
    wait_ready(cluster, namespace, "feb30", manager)

    def flagged() -> Any:
        m = get_model(cluster, namespace, "feb30") or {}
        c = next((c for c in (m.get("status") or {}).get("conditions") or []
                  if c["type"] == "UpstreamTracked"), None)
        return c if c and c["reason"] == "InvalidSchedule" else None
    c = wait_for(flagged, 30, what="UpstreamTracked=False InvalidSchedule")
    assert c["status"] == "False" and "can never fire" in c["message"]
    time.sleep(3)  # a valid "@every 2s" would have probed by now
    assert checks(hub, "acme/feb30") == 1  # the publish Job's own resolve; never a probe


# --- each probe on its own, against the real servers ----------------------------------


SETTINGS = jobs.Settings(namespace="modelcache-system", registry="127.0.0.1:1")


def model(source: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Model", "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"source": source}}


def test_probe_huggingface(hub_server, hub, small_model):
    settings = jobs.Settings(namespace="x", registry="127.0.0.1:1", hf_endpoint=hub_server.url)
    first = hub.add_repo("acme/probe", small_model)
    found = upstream.probe(model({"huggingFace": {"repo": "acme/probe"}}), settings, {})
    assert found.revision == first.sha
    # private: only with the token from the Secret
    hub.add_repo("acme/private", small_model, private=True)
    with pytest.raises(base.SourceError):
        upstream.probe(model({"huggingFace": {"repo": "acme/private"}}), settings, {})
    found = upstream.probe(model({"huggingFace": {"repo": "acme/private"}}), settings,
                           {"HF_TOKEN": "hf_test_token"})
    assert found.revision
    with pytest.raises(base.SourceNotFound):
        upstream.probe(model({"huggingFace": {"repo": "acme/nothing"}}), settings, {})
    # a commit never moves: nothing is asked
    before = len(hub.requests)
    found = upstream.probe(model({"huggingFace": {"repo": "acme/probe",
                                                  "revision": first.sha}}), settings, {})
    assert found.revision is None and "commit" in found.note
    assert len(hub.requests) == before


def test_probe_ollama(ollama_registry, ollama_client, tmp_path):
    modelgen.make_gguf_model(str(tmp_path / "g"), seed=5)
    pushed = ollama_server.push_model(ollama_client, "library/probe", "q4",
                                      str(tmp_path / "g" / "model.gguf"))
    src = {"ollama": {"model": "library/probe", "tag": "q4", "registry": ollama_registry.host}}
    assert upstream.probe(model(src), SETTINGS, {}).revision == pushed["digest"]
    # the publish pins the same string
    assert open_source(f"ollama://{ollama_registry.host}/library/probe:q4").resolve().revision \
        == pushed["digest"]
    src["ollama"]["tag"] = "missing"
    with pytest.raises(base.SourceNotFound):
        upstream.probe(model(src), SETTINGS, {})


class _NoValidators(BaseHTTPRequestHandler):
    """A server that states neither ETag nor Last-Modified (a dynamic endpoint)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()


def test_probe_http(files):
    modelgen.make_gguf_model(files.root, seed=6, name="m.gguf")
    src = {"http": {"url": f"{files.url}/m.gguf"}}
    with pytest.raises(base.SourceAuthError):  # no token: the server says 401
        upstream.probe(model(src), SETTINGS, {})
    creds = {"MODELCACHE_HTTP_TOKEN": HTTP_TOKEN}
    found = upstream.probe(model(src), SETTINGS, creds)
    assert found.revision == _etag(files, "m.gguf")
    assert found.revision == open_source(f"{files.url}/m.gguf", token=HTTP_TOKEN) \
        .resolve().revision
    # sha256 pinned: never moves, nothing asked
    with files.lock:
        before = len(files.requests)
    src["http"]["sha256"] = "a" * 64
    found = upstream.probe(model(src), SETTINGS, creds)
    assert found.revision is None and "sha256" in found.note
    assert len(files.requests) == before
    # no validators: cannot tell, said so
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NoValidators)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/model.gguf"
        found = upstream.probe(model({"http": {"url": url}}), SETTINGS, {})
        assert found.revision is None
        assert "neither ETag nor Last-Modified" in found.note and "reimport" in found.note
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_probe_s3_is_the_listing_the_publish_pins(s3, small_model):
    s3c = s3.client()
    bucket = f"probe-{uuid.uuid4().hex[:6]}"
    s3c.create_bucket(Bucket=bucket)
    for n in sorted(os.listdir(small_model)):
        s3c.upload_file(os.path.join(small_model, n), bucket, f"p/{n}")
    s3c.put_object(Bucket=bucket, Key="p/sub/", Body=b"")  # a folder marker: not a file
    s3c.put_object(Bucket=bucket, Key="other/x", Body=b"not ours")
    creds = {"AWS_ACCESS_KEY_ID": s3server.ACCESS_KEY,
             "AWS_SECRET_ACCESS_KEY": s3server.SECRET_KEY}
    src = {"s3": {"endpoint": s3.endpoint, "region": "us-east-1", "bucket": bucket,
                  "prefix": "p"}}

    def pinned() -> str:
        return open_source(f"s3://{bucket}/p/", endpoint=s3.endpoint, region="us-east-1",
                           access_key=s3server.ACCESS_KEY,
                           secret_key=s3server.SECRET_KEY).resolve().revision
    first = upstream.probe(model(src), SETTINGS, creds).revision
    assert first == pinned()
    s3c.put_object(Bucket=bucket, Key="p/config.json", Body=b'{"changed": true}')
    second = upstream.probe(model(src), SETTINGS, creds).revision
    assert second == pinned() and second != first
    with pytest.raises(base.SourceAuthError):
        upstream.probe(model(src), SETTINGS, {**creds, "AWS_SECRET_ACCESS_KEY": "wrong"})
    src["s3"]["prefix"] = "empty/"
    with pytest.raises(base.SourceNotFound):
        upstream.probe(model(src), SETTINGS, creds)


def test_probe_catalog_reads_the_source_listing(cluster):
    """The ModelCatalogSource's status.models, through a real informer: no network."""
    name = f"probe-{uuid.uuid4().hex[:6]}"
    cluster.create(k.MODEL_CATALOG_SOURCES, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelCatalogSource",
        "metadata": {"name": name}, "spec": {"url": "https://catalog.invalid"}})
    digest = "sha256:" + "b" * 64
    cluster.patch(k.MODEL_CATALOG_SOURCES, name, {"status": {
        "models": [{"name": "llama", "digest": digest}],
        "lastListedAt": "2026-05-06T12:00:00Z"}}, sub="status")
    informer = Informer(cluster, k.MODEL_CATALOG_SOURCES)
    informer.start()
    try:
        wait_for(informer.synced.is_set, 30, what="informer synced")
        obj = {"kind": "ClusterModel", "metadata": {"name": "imp"},
               "spec": {"source": {"catalog": {"sourceRef": name, "model": "llama"}}}}

        def listed() -> Any:
            try:
                return upstream.probe(obj, SETTINGS, {}, informer).revision == digest
            except base.SourceNotFound:
                return False
        wait_for(listed, 30, what="the listed digest")
        obj["spec"]["source"]["catalog"]["model"] = "gone"
        found = upstream.probe(obj, SETTINGS, {}, informer)
        assert found.revision is None and "no longer offers" in found.note
        obj["spec"]["source"]["catalog"]["sourceRef"] = "nope"
        with pytest.raises(base.SourceNotFound):
            upstream.probe(obj, SETTINGS, {}, informer)
    finally:
        informer.stop()
        cluster.delete(k.MODEL_CATALOG_SOURCES, name)


def test_probe_times_out_on_a_silent_server():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/m.gguf"
        prober = upstream.Prober(timeout=1.0, workers=1)
        start = time.monotonic()
        with pytest.raises(base.SourceUnavailable):
            prober.probe(model({"http": {"url": url}}), SETTINGS, {})
        assert time.monotonic() - start < 10.0
        prober.close()
    finally:
        silent.close()


def test_secret_values_read_like_the_publish_job(cluster, namespace):
    put_secret(cluster, namespace, "probe-creds", {"AWS_ACCESS_KEY_ID": "id",
                                                   "AWS_SECRET_ACCESS_KEY": "secret"})
    p = jobs.plan(model({"s3": {"bucket": "models", "authSecretRef": {"name": "probe-creds"}}})
                  | {"metadata": {"name": "m", "namespace": namespace}}, SETTINGS)
    assert p.secret is not None
    got = upstream.secret_values(cluster, p.secret)
    assert got == {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    with pytest.raises(base.SourceAuthError, match="no key"):
        upstream.secret_values(cluster, jobs.SecretUse(namespace, "probe-creds",
                                                       {"HF_TOKEN": "token"}))
    with pytest.raises(base.SourceAuthError, match="not found"):
        upstream.secret_values(cluster, jobs.SecretUse(namespace, "absent", {"X": "token"}))

