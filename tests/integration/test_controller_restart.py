"""The manager killed mid-publish (SIGKILL, twice) converges: one Job, Ready, nothing lost.

The FAKE kubelet holds the Job's pod so the kill lands while the publish is
"running"; a second manager must find (not duplicate) the Job named by the
publish key; it is killed too, the pod then runs and finishes with no
manager alive; a third manager reads the result from the pod's termination
message and writes Ready.
"""

from __future__ import annotations

from kube import client as k
from tests import kubeenv
from tests.fake_kubelet import FakeKubelet
from tests.integration.test_controller import (
    SYSTEM_NS,
    ManagerProcess,
    get_model,
    hf_model,
    jobs_of,
    phase_is,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import namespace as namespace

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube


def test_killed_mid_publish_converges_without_duplicate_jobs(
        kube, cluster, namespace, registry, hub, small_model, tmp_path):
    hub.add_repo("acme/crash", small_model)
    log = str(tmp_path / "manager.log")
    with FakeKubelet(cluster, SYSTEM_NS, work_root=str(tmp_path / "kubelet")) as kubelet:
        kubelet.hold()
        m1 = ManagerProcess(kube, registry.host, hub.url, log).start()
        try:
            cluster.create(k.MODELS, hf_model("crash", namespace, "acme/crash"), namespace)
            m = wait_for(phase_is(cluster, namespace, "crash", "Publishing"), 30,
                         what="Publishing")
            uid = m["metadata"]["uid"]
            assert len(jobs_of(cluster, uid)) == 1
        finally:
            m1.kill()

        m2 = ManagerProcess(kube, registry.host, hub.url, log).start()
        try:
            # the new leader takes over (lease 2 s) and looks at the model again
            wait_for(lambda: "starting workers" in m2.logs().split("manager started")[-1], 30,
                     what="second manager leading")
            cluster.patch(k.MODELS, "crash", {"metadata": {"labels": {"poke": "1"}}}, namespace)
            import time
            time.sleep(1.5)
            assert len(jobs_of(cluster, uid)) == 1, m2.logs()
            assert get_model(cluster, namespace, "crash")["status"]["phase"] == "Publishing"
        finally:
            m2.kill()

        kubelet.release()  # the pod runs to completion with no manager alive

        def job_done() -> bool:
            jobs = jobs_of(cluster, uid)
            return bool(jobs) and any(c.get("type") == "Complete" for c in
                                      (jobs[0].get("status") or {}).get("conditions") or [])
        wait_for(job_done, 60, what="Job Complete")
        assert get_model(cluster, namespace, "crash")["status"]["phase"] == "Publishing"

        m3 = ManagerProcess(kube, registry.host, hub.url, log).start()
        try:
            m = wait_for(phase_is(cluster, namespace, "crash", "Ready", "Failed"), 60,
                         what="Ready after restart")
            assert m["status"]["phase"] == "Ready", (m["status"], m3.logs())
            assert m["status"]["progress"]["percent"] == 100
            assert m["status"]["artifact"]["digest"].startswith("sha256:")
            assert len(jobs_of(cluster, uid)) == 1
            assert len([r for r in kubelet.runs if r["job"] == jobs_of(cluster, uid)[0]
                        ["metadata"]["name"]]) == 1
        finally:
            m3.stop()

