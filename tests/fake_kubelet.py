"""A FAKE kubelet (and Job controller) for tests: there is no kubelet here.

The test API server runs without kube-controller-manager or any node, so
nothing would ever turn a Job into a running process. ``FakeKubelet`` plays
both parts, for Jobs in the namespaces it is told to watch:

* like the Job controller, it creates a Pod object per attempt (labels
  ``job-name``, ``batch.kubernetes.io/job-name``, ``controller-uid``), counts
  failures against ``backoffLimit``, honours ``podFailurePolicy`` ``FailJob``
  rules on exit codes, and writes the Job's status (``active``,
  ``succeeded``/``failed``, ``Complete``/``Failed`` with the conditions the API
  server's Job status validation asks for);
* like the kubelet, it runs the pod's container command as a local
  subprocess with the container's env, resolving ``valueFrom.secretKeyRef``
  from the API server's Secrets, and reports the container's termination
  (exit code, and the termination message read from
  ``terminationMessagePath``) in the Pod's status.

Stated shortcuts: the image is not pulled; a command whose first word is
``modelcache-controller`` runs as ``python -m controller.main`` of this
checkout (what that image's entrypoint is). Paths the pod would see through
volumes (``emptyDir`` mounts and ``terminationMessagePath``) are mapped to
temp dirs/files, ``persistentVolumeClaim`` volumes to one directory per
claim (``claim_dir``, shared by every pod of the namespace, ``subPath``
honoured, read-only not enforced), and occurrences of those paths in args
and env values are rewritten accordingly, as the kubelet's bind mounts make them appear. No
resources, nodeSelector or tolerations are enforced. ``hold()`` makes new
attempts wait until ``release()``, so a test can act while a Job is "running".
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from controller.manager import kube

log = logging.getLogger(__name__)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE_LIMIT = 4096  # the kubelet keeps this much of a termination message


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubelet:
    def __init__(self, client: kube.Kube, namespace: str, *, work_root: str | None = None,
                 base_env: dict[str, str] | None = None) -> None:
        self.client = client
        self.namespace = namespace
        self.root = work_root or tempfile.mkdtemp(prefix="fake-kubelet-")
        self.base_env = base_env or {}
        self.seen: set[str] = set()  # Job uids taken on
        self.runs: list[dict[str, Any]] = []  # one per attempt: job, exit code, stderr path
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._stop = threading.Event()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def start(self) -> FakeKubelet:
        self._thread = threading.Thread(target=self._watch, daemon=True, name="fake-kubelet")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._gate.set()
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the Job controller's part -------------------------------------------

    def _watch(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    items, rv = self.client.list(kube.JOBS, self.namespace)
                    for job in items:
                        self._consider(job)
                for event in self.client.watch(kube.JOBS, rv, self.namespace, timeout_seconds=60):
                    obj = event.get("object") or {}
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._consider(obj)
                    if self._stop.is_set():
                        return
            except kube.Gone:
                rv = ""
            except Exception as e:
                log.warning("fake kubelet watch: %s", e)
                rv = ""
                self._stop.wait(0.2)

    def _consider(self, job: dict[str, Any]) -> None:
        meta = job.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return
        conds = (job.get("status") or {}).get("conditions") or []
        if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in conds):
            return
        with self._lock:
            if meta["uid"] in self.seen:
                return
            self.seen.add(meta["uid"])
        threading.Thread(target=self._run_job, args=(job,), daemon=True,
                         name=f"job-{meta['name']}").start()

    def _job_status(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        try:
            self.client.patch(kube.JOBS, job["metadata"]["name"], {"status": status},
                              self.namespace, sub="status")
        except kube.NotFound:
            pass

    def _run_job(self, job: dict[str, Any]) -> None:
        try:
            self._run_job_inner(job)
        except Exception:
            log.exception("fake kubelet: job %s", job["metadata"]["name"])

    def _run_job_inner(self, job: dict[str, Any]) -> None:
        spec = job["spec"]
        started = _now()
        self._job_status(job, {"startTime": started, "active": 1})
        limit = int(spec.get("backoffLimit", 6))
        fail_codes: set[int] = set()
        for rule in ((spec.get("podFailurePolicy") or {}).get("rules") or []):
            codes = rule.get("onExitCodes") or {}
            if rule.get("action") == "FailJob" and codes.get("operator") == "In":
                fail_codes.update(int(v) for v in codes.get("values") or [])
        failed = 0
        while not self._stop.is_set():
            self._gate.wait()
            if self._stop.is_set() or not self._exists(job):
                return
            code = self._run_pod(job)
            if code is None:
                return
            if code == 0:
                done = _now()
                self._job_status(job, {
                    "startTime": started, "active": 0, "succeeded": 1, "failed": failed,
                    "completionTime": done, "conditions": [
                        _cond("SuccessCriteriaMet", "CompletionsReached", done),
                        _cond("Complete", "CompletionsReached", done)]})
                return
            failed += 1
            reason = "PodFailurePolicy" if code in fail_codes else (
                "BackoffLimitExceeded" if failed > limit else "")
            if reason:
                done = _now()
                self._job_status(job, {
                    "startTime": started, "active": 0, "failed": failed, "conditions": [
                        _cond("FailureTarget", reason, done),
                        _cond("Failed", reason, done)]})
                return
            self._job_status(job, {"startTime": started, "active": 1, "failed": failed})
            time.sleep(min(0.2 * 2 ** failed, 2.0))

    def _exists(self, job: dict[str, Any]) -> bool:
        try:
            cur = self.client.get(kube.JOBS, job["metadata"]["name"], self.namespace)
        except kube.NotFound:
            return False
        return not (cur.get("metadata") or {}).get("deletionTimestamp")

    # -- the kubelet's part ----------------------------------------------------

    def _ensure_service_account(self, name: str) -> None:
        try:
            self.client.create(kube.Resource("", "v1", "serviceaccounts"), {
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": name, "namespace": self.namespace}}, self.namespace)
        except kube.Conflict:
            pass

    def _run_pod(self, job: dict[str, Any]) -> int | None:
        jmeta = job["metadata"]
        template = job["spec"]["template"]
        pod_spec = dict(template["spec"])
        self._ensure_service_account(pod_spec.get("serviceAccountName") or "default")
        name = f"{jmeta['name'][:57]}-{secrets.token_hex(2)}"
        labels = {**((template.get("metadata") or {}).get("labels") or {}),
                  "job-name": jmeta["name"], "batch.kubernetes.io/job-name": jmeta["name"],
                  "controller-uid": jmeta["uid"], "batch.kubernetes.io/controller-uid": jmeta["uid"]}
        pod = self.client.create(kube.PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                              "name": jmeta["name"], "uid": jmeta["uid"],
                                              "controller": True}]},
            "spec": pod_spec}, self.namespace)
        container = pod_spec["containers"][0]
        start = _now()
        self._pod_status(name, {"phase": "Running", "startTime": start, "containerStatuses": [
            _cstatus(container, {"running": {"startedAt": start}})]})
        pod_dir = os.path.join(self.root, pod["metadata"]["uid"])
        os.makedirs(pod_dir)
        mapping = self._mounts(pod_spec, container, pod_dir)
        term_path = container.get("terminationMessagePath") or "/dev/termination-log"
        host_term = os.path.join(pod_dir, "termination-log")
        open(host_term, "w").close()
        mapping[term_path] = host_term
        env = self._env(container, mapping)
        if env is None:  # a missing Secret: the kubelet would report CreateContainerConfigError
            self._pod_status(name, {"phase": "Failed", "containerStatuses": [_cstatus(
                container, {"terminated": {"exitCode": 1, "reason": "CreateContainerConfigError",
                                           "startedAt": start, "finishedAt": _now()}})]})
            return 1
        argv = [_rewrite(a, mapping) for a in (container.get("command") or [])
                + (container.get("args") or [])]
        if argv and argv[0] == "modelcache-controller":
            argv = [sys.executable, "-m", "controller.main", *argv[1:]]
        stderr_path = os.path.join(pod_dir, "stderr")
        with open(stderr_path, "wb") as err, open(os.path.join(pod_dir, "stdout"), "wb") as out:
            proc = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL)
            with self._lock:
                self._procs.add(proc)
            code = proc.wait()
            with self._lock:
                self._procs.discard(proc)
        if self._stop.is_set():
            return None
        with open(host_term, "rb") as f:
            message = f.read(MESSAGE_LIMIT).decode(errors="replace")
        self.runs.append({"job": jmeta["name"], "pod": name, "exitCode": code,
                          "stderr": stderr_path})
        self._pod_status(name, {"phase": "Succeeded" if code == 0 else "Failed",
                                "containerStatuses": [_cstatus(container, {"terminated": {
                                    "exitCode": code, "message": message,
                                    "reason": "Completed" if code == 0 else "Error",
                                    "startedAt": start, "finishedAt": _now()}})]})
        return code

    def _pod_status(self, name: str, status: dict[str, Any]) -> None:
        try:
            self.client.patch(kube.PODS, name, {"status": status}, self.namespace, sub="status")
        except kube.NotFound:
            pass

    def claim_dir(self, claim: str) -> str:
        """The directory standing for PVC ``claim`` of this namespace (every pod shares it)."""
        return os.path.join(self.root, "pvcs", claim)

    def _mounts(self, pod_spec: dict[str, Any], container: dict[str, Any],
                pod_dir: str) -> dict[str, str]:
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        out = {}
        for m in container.get("volumeMounts") or []:
            v = volumes.get(m["name"]) or {}
            if "emptyDir" in v:
                host = os.path.join(pod_dir, "volumes", m["name"])
            elif "persistentVolumeClaim" in v:
                # no provisioner, no binding: one directory per claim, made on first use
                host = self.claim_dir(v["persistentVolumeClaim"]["claimName"])
            else:
                continue
            os.makedirs(host, exist_ok=True)
            if m.get("subPath"):
                host = os.path.join(host, m["subPath"])
            out[m["mountPath"]] = host
        return out

    def _env(self, container: dict[str, Any], mapping: dict[str, str]) -> dict[str, str] | None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.root,
               "LANG": "C.UTF-8", "PYTHONPATH": REPO_ROOT, **self.base_env}
        for e in container.get("env") or []:
            if "value" in e:
                env[e["name"]] = _rewrite(str(e["value"]), mapping)
                continue
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                continue
            try:
                secret = self.client.get(kube.SECRETS, ref["name"], self.namespace)
            except kube.NotFound:
                if ref.get("optional"):
                    continue
                return None
            raw = (secret.get("data") or {}).get(ref["key"])
            if raw is None:
                if ref.get("optional"):
                    continue
                return None
            env[e["name"]] = base64.b64decode(raw).decode()
        return env


def _rewrite(value: str, mapping: dict[str, str]) -> str:
    for path in sorted(mapping, key=len, reverse=True):
        if value == path or value.startswith(path + "/"):
            return mapping[path] + value[len(path):]
    return value


def _cond(type_: str, reason: str, ts: str) -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "lastProbeTime": ts,
            "lastTransitionTime": ts}


def _cstatus(container: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    return {"name": container["name"], "image": container.get("image", ""), "imageID": "",
            "ready": "running" in state, "restartCount": 0, "started": "running" in state,
            "state": state}
