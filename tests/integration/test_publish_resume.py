"""A retried publish Job resumes its download instead of starting from byte 0.

The manager runs as a subprocess with ``--publish-work-size`` against the real
API server; the embedded mode's Job runner (controller/embedded/jobrunner.py,
playing the Job controller, kubelet and volume provisioner) runs the publish
Job's real command, ``modelcache-controller publish``, with the Job's work
PVC as a directory kept across attempts. The source is a loopback HTTP server
that counts the body bytes it sends (tests/servers/counting.py) and holds the
first transfer at 60 % of a generated 1 GiB single-file safetensors model; the
worker is SIGKILLed there, the Job's next pod finds the ``.part`` and asks for
the rest with ``Range``. Acceptance: the retry fetched at most 45 % of the file
(it fetches ~40 %; without the PVC it fetches 100 %), the artifact's layer is
the file's sha256, the PVC was owned by the Job and is gone once it finished.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api import names
from cli.local import registry as localregistry
from controller.embedded.jobrunner import JobRunner
from kube import client as k
from tests import kubeenv, modelgen
from tests.integration.test_controller import (
    ManagerProcess,
    ensure_namespace,
    get_model,
    install_crds,
    phase_is,
    wait_for,
)
from tests.servers.counting import CountingServer

kube = kubeenv.kube

SIZE = 1 << 30  # the acceptance's 1 GiB (about 20 s end to end on 2 cores)
HOLD = 0.60  # the first pod is killed once this much of the file has been sent
FILE = "model.safetensors"


@pytest.fixture(scope="module")
def env(kube: kubeenv.KubeEnv, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[dict[str, Any]]:
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    system = f"mc-resume-{uuid.uuid4().hex[:6]}"  # Jobs, PVCs, the Lease: none from others
    users = f"resume-{uuid.uuid4().hex[:6]}"
    ensure_namespace(client, system)
    ensure_namespace(client, users)
    www = str(tmp_path_factory.mktemp("www"))
    with localregistry.running() as reg, CountingServer(www) as cs, \
            JobRunner(client, system, work_root=str(tmp_path_factory.mktemp("jobs"))) as runner:
        m = ManagerProcess(kube, reg.host, "http://127.0.0.1:9", str(
            tmp_path_factory.mktemp("manager") / "manager.log"),
            extra=["--namespace", system, "--publish-work-size", "3Gi",
                   "--publish-work-storage-class", "local"]).start()
        try:
            yield {"client": client, "system": system, "ns": users, "server": cs,
                   "runner": runner, "manager": m, "registry": reg}
        finally:
            m.kill()  # SIGKILL: a SIGTERM waits out its 10 s grace here
    client.close()


def _worker_pid(target: str) -> int | None:
    """The publish worker pushing to ``target`` (the Job's command names it)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"publish" in argv and target.encode() in argv:
            return int(pid)
    return None


def _parts(root: str) -> list[str]:
    return [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns if n.endswith(".part")]


def test_killed_publish_job_resumes_on_retry(env: dict[str, Any]) -> None:
    client, system, ns = env["client"], env["system"], env["ns"]
    cs: CountingServer = env["server"]
    runner: JobRunner = env["runner"]
    path = os.path.join(cs.root, FILE)
    modelgen.write_big_safetensors(path, SIZE - 128)  # header + data: about SIZE bytes
    size = os.path.getsize(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            sha.update(chunk)
    cs.hold_at = int(size * HOLD)
    t0 = time.monotonic()
    try:
        client.create(k.MODELS, {
            "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": "big", "namespace": ns},
            "spec": {"source": {"http": {"url": f"{cs.url}/{FILE}"}}}}, ns)
        assert cs.holding.wait(90), env["manager"].logs()
        uid = client.get(k.MODELS, "big", ns)["metadata"]["uid"]
        (job,) = client.list(k.JOBS, system, label_selector=f"{names.LABEL_UID}={uid}")[0]
        jname = job["metadata"]["name"]

        # the work volume: a claim per Job, owned by it, mounted at the work dir
        pvc = client.get(k.PVCS, f"{jname}-work", system)
        assert pvc["spec"]["resources"]["requests"]["storage"] == "3Gi"
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert pvc["spec"]["storageClassName"] == "local"
        assert [o["uid"] for o in pvc["metadata"]["ownerReferences"]] == [job["metadata"]["uid"]]
        pod_spec = job["spec"]["template"]["spec"]
        assert {"name": "work", "persistentVolumeClaim": {"claimName": f"{jname}-work"}} \
            in pod_spec["volumes"]
        assert pod_spec["securityContext"]["fsGroup"] == 65532

        # the first pod has written nearly all it was sent; kill it there (SIGKILL: no
        # clean-up of its own runs, as when a node dies or the OOM killer strikes)
        claim = runner.claim_dir(f"{jname}-work")
        wait_for(lambda: any(os.path.getsize(p) >= cs.hold_at - (16 << 20)
                             for p in _parts(claim)), 30, what="the first pod's .part")
        pid = wait_for(lambda: _worker_pid(job["metadata"]["annotations"][names.ANN_TARGET]),
                       10, what="the worker process")
        os.kill(pid, signal.SIGKILL)
        first = len(cs.served)  # the next pod's GET waits for ``release``
        wait_for(lambda: [r for r in runner.runs if r["job"] == jname], 10, what="pod 1 ended")
        kept = max(os.path.getsize(p) for p in _parts(claim))
        cs.release.set()

        m = wait_for(phase_is(client, ns, "big", "Ready", "Failed"), 180, what="Ready")
        assert m["status"]["phase"] == "Ready", (m["status"], env["manager"].logs())
        retry = cs.body_bytes(first)
        print(f"first pod: {cs.body_bytes() - retry} bytes sent, {kept} kept; "
              f"retry: {retry} bytes = {retry / size:.1%} of {size}; "
              f"Ready {time.monotonic() - t0:.1f} s after the Model was created")
        assert retry <= 0.45 * size, cs.served
        # one ranged GET, from where the first pod's .part ended
        assert [r for r, _ in cs.served[first:]] == [f"bytes={kept}-"]
        runs = [r["exitCode"] for r in runner.runs if r["job"] == jname]
        assert runs == [128 + signal.SIGKILL, 0]
        assert m["status"]["artifact"]["sizeBytes"] >= size
        # the layer is the source's bytes, whole: the registry checked them by digest
        blob = env["registry"].blob_path("sha256:" + sha.hexdigest())
        assert os.path.getsize(blob) == size

        # finished: the work volume is deleted (the runner drops pvc-protection, and
        # its directory with it)
        def gone() -> bool:
            try:
                client.get(k.PVCS, f"{jname}-work", system)
            except k.NotFound:
                return True
            return False
        wait_for(gone, 30, what="the work PVC deleted")
        wait_for(lambda: not os.path.exists(claim), 10, what="the claim's directory removed")
    finally:
        cs.release.set()
        try:
            client.delete(k.MODELS, "big", ns)
            wait_for(lambda: get_model(client, ns, "big") is None, 30, what="model deleted")
        finally:
            os.unlink(path)
            reg = env["registry"]
            blob = reg.blob_path("sha256:" + sha.hexdigest())
            if os.path.exists(blob):
                os.unlink(blob)  # 1 GiB less on disk for the rest of the session
