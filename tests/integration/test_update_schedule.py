"""``spec.updatePolicy.schedule``: a moved upstream branch is published again, a still one is not.

The manager runs as a subprocess against the real API server with the HF
test hub (tests/servers/hfhub.py) and a real registry; the FAKE kubelet runs
the publish Jobs (see tests/integration/test_controller.py). The CRD admits
``@every 2s``, so the schedule runs on the real clock here: the hub's
request log shows each check. Also, without a cluster: the scheduler on an
injected clock checks once per interval, and what counts as a move.
"""

from __future__ import annotations

from typing import Any

from controller.manager import jobs, schedule
from controller.manager import kube as k
from tests import kubeenv
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import (
    cond,
    events_of,
    get_model,
    hf_model,
    jobs_of,
    phase_is,
    wait_for,
)
from tests.integration.test_controller import kubelet as kubelet
from tests.integration.test_controller import manager as manager
from tests.integration.test_controller import namespace as namespace

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube
EVERY = "@every 2s"


def scheduled(name: str, ns: str, repo: str) -> dict[str, Any]:
    m = hf_model(name, ns, repo)
    m["spec"]["updatePolicy"] = {"schedule": EVERY}
    return m


def checks(hub: Any, repo: str) -> int:
    """Revision look-ups of ``repo``'s main branch the hub has answered."""
    path = f"/api/models/{repo}/revision/main"
    with hub.lock:
        return sum(1 for method, p, _ in hub.requests if method == "GET" and p == path)


def wait_checks(hub: Any, repo: str, more: int) -> None:
    start = checks(hub, repo)
    wait_for(lambda: checks(hub, repo) >= start + more, 60, interval=0.2,
             what=f"{more} more upstream checks of {repo}")


def test_moved_branch_is_published_again_still_one_is_not(cluster, namespace, manager, hub,
                                                          small_model):
    first = hub.add_repo("acme/sched", small_model)
    cluster.create(k.MODELS, scheduled("sched", namespace, "acme/sched"), namespace)
    m = wait_for(phase_is(cluster, namespace, "sched", "Ready", "Failed"), 90, what="Ready")
    assert m["status"]["phase"] == "Ready", (m["status"], manager.logs())
    uid = m["metadata"]["uid"]
    assert m["status"]["source"]["resolvedRevision"] == first.sha
    digest, key = m["status"]["artifact"]["digest"], m["status"]["publish"]["key"]

    # still upstream: checked (the hub sees the look-ups), nothing published again
    wait_checks(hub, "acme/sched", 2)
    m = get_model(cluster, namespace, "sched")
    assert len(jobs_of(cluster, uid)) == 1
    assert m["status"]["publish"]["key"] == key
    assert "modelcache.io/upstream-revision" not in (m["metadata"].get("annotations") or {})

    # the branch moves to a new commit (one more file): published again from it
    second = hub.add_repo("acme/sched", small_model, files={"README.md": b"# v2\n"})
    assert second.sha != first.sha

    def republished() -> Any:
        cur = get_model(cluster, namespace, "sched")
        st = (cur or {}).get("status") or {}
        return cur if st.get("phase") == "Ready" and \
            st["source"]["resolvedRevision"] == second.sha else None
    m = wait_for(republished, 90, what="published again from the new commit")
    assert m["status"]["artifact"]["digest"] != digest
    assert m["metadata"]["annotations"]["modelcache.io/upstream-revision"] == second.sha
    assert cond(m, "Ready")["status"] == "True"
    assert len(jobs_of(cluster, uid)) == 2
    wait_for(lambda: [e for e in events_of(cluster, namespace, uid)
                      if e["reason"] == "UpstreamMoved" and second.sha[:12] in e["message"]],
             10, what="the UpstreamMoved event")

    # and still again: more checks, no third Job
    wait_checks(hub, "acme/sched", 2)
    assert len(jobs_of(cluster, uid)) == 2


def test_failed_after_a_move_recovers_on_a_later_commit(cluster, namespace, manager, hub,
                                                        small_model):
    hub.add_repo("acme/fixed", small_model)
    cluster.create(k.MODELS, scheduled("fixed", namespace, "acme/fixed"), namespace)
    m = wait_for(phase_is(cluster, namespace, "fixed", "Ready", "Failed"), 90, what="Ready")
    assert m["status"]["phase"] == "Ready", m["status"]
    uid, digest = m["metadata"]["uid"], m["status"]["artifact"]["digest"]

    # a commit whose weights arrive corrupt: the re-publish fails
    broken = hub.add_repo("acme/fixed", small_model, files={"README.md": b"# broken\n"})
    hub.knobs.corrupt.add("model.safetensors")
    m = wait_for(phase_is(cluster, namespace, "fixed", "Failed"), 90, what="Failed")
    assert cond(m, "Ready")["reason"] == "ChecksumMismatch", cond(m, "Ready")
    assert m["status"]["artifact"]["digest"] == digest  # the old artifact stays
    assert m["metadata"]["annotations"]["modelcache.io/upstream-revision"] == broken.sha
    # the same broken commit is not asked for again
    wait_checks(hub, "acme/fixed", 2)
    assert len(jobs_of(cluster, uid)) == 2

    # upstream repairs it in a later commit: the schedule still runs, and publishes it
    hub.knobs.corrupt.clear()
    fixed = hub.add_repo("acme/fixed", small_model, files={"README.md": b"# fixed\n"})
    m = wait_for(phase_is(cluster, namespace, "fixed", "Ready"), 90, what="Ready again")
    assert m["status"]["source"]["resolvedRevision"] == fixed.sha
    assert len(jobs_of(cluster, uid)) == 3


# --- without a cluster ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_scheduler_checks_once_per_interval():
    clock = Clock()
    s = schedule.Scheduler(clock=clock, jitter=(1.0, 1.0))
    key = ("Model", "ns", "m")
    assert s.due(key, 10.0) == 10.0  # first sight: one interval from now
    clock.now += 10.0
    assert s.due(key, 10.0) <= 0
    s.checked(key, 10.0)
    # the next check is one interval after this one, not two
    assert s.due(key, 10.0) == 10.0
    clock.now += 4.0
    assert s.due(key, 10.0) == 6.0
    assert s.due(key, 10.0, reset=True) == 10.0  # a publish restarts the interval
    s.forget(key)
    clock.now += 1.0
    assert s.due(key, 10.0) == 10.0


def test_scheduler_jitter_stays_within_the_interval():
    clock = Clock()
    s = schedule.Scheduler(clock=clock)
    dues = [s.due(("Model", "ns", str(i)), 100.0) for i in range(200)]
    assert all(95.0 <= d <= 100.0 for d in dues)
    assert len(set(dues)) > 1


def _model(resolved: str = "", asked: str = "", source: str = "huggingFace") -> dict[str, Any]:
    ann = {jobs.UPSTREAM: asked} if asked else {}
    return {"metadata": {"name": "m", "annotations": ann},
            "spec": {"source": {source: {"repo": "a/b"}}},
            "status": {"source": {"resolvedRevision": resolved}} if resolved else {}}


def test_what_counts_as_a_move():
    assert schedule.moved(_model("aaa"), "bbb")
    assert not schedule.moved(_model("aaa"), "aaa")
    assert not schedule.moved(_model("aaa"), None)
    # asked for already (its publish failed, or resolved a newer commit): not again
    assert not schedule.moved(_model("aaa", asked="bbb"), "bbb")
    assert schedule.moved(_model("aaa", asked="bbb"), "ccc")
    assert schedule.applies(_model("aaa"))
    assert schedule.applies(_model("", asked="bbb"))
    assert not schedule.applies(_model(""))  # failed its first publish: nothing to compare
    assert not schedule.applies(_model("sha256:x", source="upload"))


def test_intervals():
    assert schedule.interval("@every 2s") == 2.0
    assert schedule.interval("@every 1h30m") == 5400.0
    assert schedule.interval("@every 500ms") == 0.5
    assert schedule.interval("@hourly") == 3600.0
    assert schedule.interval("0 3 * * *") == 86400.0  # cron: read as daily
    assert schedule.interval("@every 0s") is None
    assert schedule.interval("") is None

