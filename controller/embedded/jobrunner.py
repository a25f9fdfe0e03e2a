"""The embedded mode's Job executor: the manager's Jobs as local processes.

A stated shortcut, because no kubelet (and no kube-controller-manager) runs
in the embedded mode: nothing else would turn the manager's publish Jobs
into running containers. ``JobRunner`` watches the Jobs labelled
``app.kubernetes.io/managed-by=modelcache-controller`` in the controller's
namespace and plays both missing parts, so the manager sees exactly what a
cluster would show it:

* the Job controller's: one Pod object per attempt (labels ``job-name``,
  ``batch.kubernetes.io/job-name``, ``controller-uid``), failures counted
  against ``backoffLimit``, ``podFailurePolicy`` ``FailJob`` rules on exit
  codes honoured, and the Job's status (``active``, ``succeeded``/``failed``,
  ``Complete``/``Failed`` with the conditions the API server's Job status
  validation requires);
* the kubelet's: the container's command runs as a local subprocess with the
  container's env (``valueFrom.secretKeyRef`` read from the API server),
  and its termination (exit code, 128+N for a signal N as a container
  runtime reports it, and the termination message read from
  ``terminationMessagePath``, which is where the manager reads the publish
  result) is written to the Pod's status;
* the kubelet's for ``secret`` volumes (how the manager's Jobs get every
  credential and a source URL: ``controller/jobspec.py``): the Secret's keys
  (or its ``items``) written as files 0600 into a directory 0700 of the
  pod's own, removed when the attempt ends; a missing Secret (not
  ``optional``) is ``CreateContainerConfigError``, as for ``secretKeyRef``;
* the volume provisioner's and the pvc-protection controller's, for
  ``persistentVolumeClaim`` volumes (a publish Job's work volume,
  ``--publish-work-size``): a claim is one directory per namespace and
  claim (``claim_dir``), shared by every pod that mounts it and kept across
  attempts, which is what lets a retried publish resume; once the claim is
  deleted and no running pod uses it, its directory is removed and the
  ``kubernetes.io/pvc-protection`` finalizer dropped (``claims.py``).

Also the Job controller's ``activeDeadlineSeconds`` (counted from the
Job's ``startTime``: the running attempt is killed and the Job Failed with
reason ``DeadlineExceeded``), and the kubelet's ``FallbackToLogsOnError``
(a failed container that wrote no termination message gets the tail of its
log: the last 80 lines, at most 2048 bytes, of its stdout then stderr).
``csi`` volumes are mapped only when the runner is given ``csi``, a
function of (the volume's ``csi`` source, the pod's namespace) returning
the directory to show (the node plugin's part; tests resolve and pull the
model there); if it raises, the pod fails with ``FailedMount``.

What is not done: the image is not pulled (a command whose first word is
``modelcache-controller`` runs as ``python -m controller.main`` of this
install, which is that image's entrypoint); the process runs in its pod's
own directory under ``work_root``, where ``emptyDir`` mounts (``subPath``
honoured; removed when the attempt ends, as the pod's would be), claims and
the termination message path are mapped, and those paths in args and env
values are rewritten to match, as a bind mount would make them appear; a
claim need not exist or be bound (no scheduler holds the pod in Pending),
and read-only is not enforced; resources, nodeSelector, tolerations and the
security context are not enforced. A Job deleted while it runs has its
process killed. ``hold()`` makes new attempts wait until ``release()``.
A container dies with the runner (parent-death signal), and a restarted
runner marks the gone runner's pods Failed (``DisruptionTarget``, not
counted against ``backoffLimit``) and keeps the Job's ``startTime`` and
failure count.

Why one file of ~440 lines: the Job controller's half and the kubelet's half
share one process table, one stop/hold gate and one lock; split, each would
reach into the other's state.
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
from collections.abc import Callable
from typing import Any

from api import jobresult, names
from api.conditions import now as _now
from controller.embedded.claims import Claims
from kube import client as kube

log = logging.getLogger(__name__)
# what `python -m controller.main` needs on sys.path when this is a checkout
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SELECTOR = f"{names.LABEL_MANAGED}={names.MANAGER}"
SETPRIV = shutil.which("setpriv")  # util-linux: sets the parent-death signal, then execs
SERVICE_ACCOUNTS = kube.Resource("", "v1", "serviceaccounts", True, "ServiceAccount")
LOG_LINES, LOG_BYTES = 80, 2048  # the kubelet's FallbackToLogsOnError tail
CsiMount = Callable[[dict[str, Any], str], str]  # (csi volume source, namespace) -> directory


class JobRunner:
    """Runs the manager's Jobs in ``namespace`` as local processes (see the module doc).

    ``label_selector=None`` takes on every Job of the namespace.
    """

    def __init__(self, client: kube.Kube, namespace: str, *, work_root: str | None = None,
                 base_env: dict[str, str] | None = None,
                 label_selector: str | None = SELECTOR, csi: CsiMount | None = None) -> None:
        self.client = client
        self.namespace = namespace
        self.label_selector = label_selector
        self.root = work_root or tempfile.mkdtemp(prefix="modelcache-jobs-")
        self.base_env = base_env or {}
        self.seen: set[str] = set()  # Job uids taken on
        self.runs: list[dict[str, Any]] = []  # one per finished attempt: job, pod, exit code
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._stop = threading.Event()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # Job uid -> its running attempt
        self._deleted: set[str] = set()  # uids of Jobs whose running attempt was killed
        self.claims = Claims(client, namespace, os.path.join(self.root, "pvcs", namespace))
        self.csi = csi
        self._deadlines: dict[str, float] = {}  # Job uid -> activeDeadlineSeconds, as epoch
        self._expired: set[str] = set()  # uids of Jobs killed at their deadline
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def start(self) -> JobRunner:
        self._thread = threading.Thread(target=self._watch, daemon=True, name="job-runner")
        self._thread.start()
        self.claims.start(self._stop)
        return self

    def stop(self) -> None:
        """Kill running attempts and remove ``root`` with every attempt's files."""
        self._stop.set()
        self._gate.set()
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> JobRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def claim_dir(self, claim: str) -> str:
        """The directory standing for PVC ``claim`` of this namespace (every pod shares it)."""
        return self.claims.dir(claim)

    # -- the Job controller's part -------------------------------------------

    def _watch(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    items, rv = self.client.list(kube.JOBS, self.namespace,
                                                 label_selector=self.label_selector)
                    for job in items:
                        self._consider(job)
                # short watches: stop() is noticed within that long
                for event in self.client.watch(kube.JOBS, rv, self.namespace,
                                               label_selector=self.label_selector,
                                               timeout_seconds=10):
                    obj = event.get("object") or {}
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._consider(obj)
                    elif event.get("type") == "DELETED":
                        self._kill((obj.get("metadata") or {}).get("uid", ""))
                    if self._stop.is_set():
                        return
            except kube.Gone:
                rv = ""
            except Exception as e:  # the API server restarting: list again
                log.warning("job runner watch failed; listing again", extra={"error": str(e)})
                rv = ""
                self._stop.wait(0.5)

    def _consider(self, job: dict[str, Any]) -> None:
        meta = job.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            self._kill(meta.get("uid", ""))
            return
        if jobresult.state(job) != jobresult.ACTIVE:
            return
        with self._lock:
            if meta["uid"] in self.seen:
                return
            self.seen.add(meta["uid"])
        threading.Thread(target=self._run_job, args=(job,), daemon=True,
                         name=f"job-{meta['name']}").start()

    def _kill(self, uid: str) -> None:
        with self._lock:
            proc = self._procs.get(uid)
        if proc is not None and proc.poll() is None:
            log.info("job deleted: killing its process", extra={"jobUid": uid, "pid": proc.pid})
            with self._lock:
                self._deleted.add(uid)
            proc.kill()

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
            log.exception("job runner: job failed to run", extra={"job": job["metadata"]["name"]})

    def _run_job_inner(self, job: dict[str, Any]) -> None:
        spec = job["spec"]
        # a Job a previous runner (a killed manager) started: its startTime is
        # immutable and its failures count; its pods died with that runner
        # (their processes had PR_SET_PDEATHSIG), so they are marked Failed here
        # as the node-lifecycle controller would mark a lost node's pods
        st = job.get("status") or {}
        started = str(st.get("startTime") or _now())
        self._fail_orphans(job)
        self._job_status(job, {"startTime": started, "active": 1})
        limit = int(spec.get("backoffLimit", 6))
        fail_codes: set[int] = set()
        for rule in ((spec.get("podFailurePolicy") or {}).get("rules") or []):
            codes = rule.get("onExitCodes") or {}
            if rule.get("action") == "FailJob" and codes.get("operator") == "In":
                fail_codes.update(int(v) for v in codes.get("values") or [])
        failed = int(st.get("failed") or 0)
        uid = job["metadata"]["uid"]
        if spec.get("activeDeadlineSeconds"):
            self._deadlines[uid] = _epoch(started) + int(spec["activeDeadlineSeconds"])
        while not self._stop.is_set():
            self._gate.wait()
            if self._stop.is_set() or not self._exists(job):
                return
            code = None if self._past_deadline(uid) else self._run_pod(job)
            if self._stop.is_set():
                return
            if code != 0 and (uid in self._expired or self._past_deadline(uid)):
                done = _now()
                self._job_status(job, {
                    "startTime": started, "active": 0, "failed": failed + (code is not None),
                    "conditions": [_cond("FailureTarget", "DeadlineExceeded", done),
                                   _cond("Failed", "DeadlineExceeded", done)]})
                return
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
            # the Job controller's back-off between attempts, shortened
            self._stop.wait(min(0.2 * 2 ** failed, 2.0))

    def _past_deadline(self, uid: str) -> bool:
        deadline = self._deadlines.get(uid)
        return deadline is not None and time.time() >= deadline

    def _wait(self, proc: subprocess.Popen[bytes], uid: str) -> int:
        """The process's exit status; killed at its Job's deadline (``_expired``)."""
        while True:
            deadline = self._deadlines.get(uid)
            try:
                return proc.wait(None if deadline is None else max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with self._lock:
                    self._expired.add(uid)
                proc.kill()

    def _fail_orphans(self, job: dict[str, Any]) -> None:
        """Mark Failed the pods of ``job`` still shown running by a runner that is gone.

        Not counted as the Job's failures: like pods of a lost node, they
        failed for no fault of their own (a DisruptionTarget).
        """
        uid = job["metadata"]["uid"]
        pods, _ = self.client.list(kube.PODS, self.namespace,
                                   label_selector=f"batch.kubernetes.io/controller-uid={uid}")
        for pod in pods:
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            # its volumes (Secret files, emptyDirs) went with no one to remove them
            shutil.rmtree(os.path.join(self.root, str(pod["metadata"].get("uid")), "volumes"),
                          ignore_errors=True)
            now = _now()
            self._pod_status(pod["metadata"]["name"], {
                "phase": "Failed", "reason": "NodeLost",
                "message": "the embedded job runner that ran this pod is gone",
                "conditions": [{"type": "DisruptionTarget", "status": "True",
                                "reason": "DeletionByPodGC", "lastTransitionTime": now}]})

    def _exists(self, job: dict[str, Any]) -> bool:
        try:
            cur = self.client.get(kube.JOBS, job["metadata"]["name"], self.namespace)
        except kube.NotFound:
            return False
        return not (cur.get("metadata") or {}).get("deletionTimestamp")

    # -- the kubelet's part ----------------------------------------------------

    def _ensure_service_account(self, name: str) -> None:
        # no kube-controller-manager creates "default" in a new namespace; the
        # Pod would be refused by the ServiceAccount admission plugin without it
        try:
            self.client.create(SERVICE_ACCOUNTS, {
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
        try:
            return self._run_container(jmeta, name, pod_spec, container, pod_dir, start)
        finally:
            # the pod's emptyDirs go with it; stdout/stderr stay for ``runs``
            shutil.rmtree(os.path.join(pod_dir, "volumes"), ignore_errors=True)

    def _run_container(self, jmeta: dict[str, Any], name: str, pod_spec: dict[str, Any],
                       container: dict[str, Any], pod_dir: str, start: str) -> int | None:
        why = "CreateContainerConfigError"
        try:
            mapping: dict[str, str] | None = self._mounts(pod_spec, container, pod_dir)
        except _SecretMissing:
            mapping = None
        except _MountFailed:
            mapping, why = None, "FailedMount"
        env = None if mapping is None else self._env(container, mapping)
        if mapping is None or env is None:
            # a missing Secret: the kubelet would report CreateContainerConfigError
            self._pod_status(name, {"phase": "Failed", "containerStatuses": [_cstatus(
                container, {"terminated": {"exitCode": 1, "reason": why,
                                           "startedAt": start, "finishedAt": _now()}})]})
            return 1
        term_path = container.get("terminationMessagePath") or jobresult.TERMINATION_LOG
        host_term = os.path.join(pod_dir, "termination-log")
        open(host_term, "w").close()
        mapping[term_path] = host_term
        argv = [_rewrite(a, mapping) for a in (container.get("command") or [])
                + (container.get("args") or [])]
        if argv and argv[0] == "modelcache-controller":
            argv = [sys.executable, "-m", "controller.main", *argv[1:]]
        if argv and SETPRIV and shutil.which(argv[0]):
            # the container dies with this runner, as a pod's processes die with
            # their node: no orphan keeps writing to a work volume the next
            # attempt uses (the death signal follows the spawning thread, which
            # waits for the process)
            argv = [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        stderr_path = os.path.join(pod_dir, "stderr")
        with open(stderr_path, "wb") as err, open(os.path.join(pod_dir, "stdout"), "wb") as out:
            try:
                proc = subprocess.Popen(argv, env=env, cwd=pod_dir, stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL)
            except OSError as e:  # the kubelet's "executable file not found"
                err.write(f"{e}\n".encode())
                code = 128
            else:
                with self._lock:
                    self._procs[jmeta["uid"]] = proc
                code = self._wait(proc, jmeta["uid"])
                if code < 0:  # killed by signal -N: a container runtime reports 128+N
                    code = 128 - code
                with self._lock:
                    self._procs.pop(jmeta["uid"], None)
        if self._stop.is_set():
            return None
        with open(host_term, "rb") as f:
            message = f.read(jobresult.MESSAGE_LIMIT).decode(errors="replace")
        if code != 0 and not message.strip() \
                and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _log_tail(pod_dir)
        with self._lock:
            deleted = jmeta["uid"] in self._deleted
        # "deleted": killed because its Job was deleted (as kubelet kills the pod's
        # containers), not a failure of its own
        self.runs.append({"job": jmeta["name"], "pod": name, "exitCode": code,
                          "stderr": stderr_path, "deleted": deleted})
        log.info("job attempt finished", extra={"job": jmeta["name"], "pod": name,
                                                "exitCode": code})
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

    def _mounts(self, pod_spec: dict[str, Any], container: dict[str, Any],
                pod_dir: str) -> dict[str, str]:
        """Each mount path the container sees -> the host directory standing for it."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        out = {}
        for m in container.get("volumeMounts") or []:
            host = self._volume_dir(volumes.get(m["name"]) or {}, pod_dir)
            if host is None:
                continue
            os.makedirs(host, exist_ok=True)
            if m.get("subPath"):
                host = os.path.join(host, m["subPath"])
            out[m["mountPath"]] = host
        return out

    def _volume_dir(self, volume: dict[str, Any], pod_dir: str) -> str | None:
        """The host directory for a pod ``volume``, or None for a kind not mapped.

        ``emptyDir`` (the pod's own), ``secret`` (``_secret_dir``) and
        ``persistentVolumeClaim`` (``claim_dir``): the manager's Jobs mount nothing else.
        """
        if "emptyDir" in volume:
            return os.path.join(pod_dir, "volumes", volume["name"])
        if "secret" in volume:
            return self._secret_dir(volume, pod_dir)
        if "persistentVolumeClaim" in volume:
            return self.claims.dir(volume["persistentVolumeClaim"]["claimName"])
        if "csi" in volume and self.csi is not None:
            try:
                return self.csi(volume["csi"], self.namespace)
            except Exception as e:  # the kubelet's FailedMount: the container never starts
                log.info("csi volume not mounted", extra={"error": str(e)[:300]})
                raise _MountFailed(str(e)) from e
        return None

    def _secret_dir(self, volume: dict[str, Any], pod_dir: str) -> str:
        """The Secret's keys as files 0600 in a directory 0700 of this pod's (gone with it)."""
        src = volume["secret"]
        host = os.path.join(pod_dir, "volumes", volume["name"])
        os.makedirs(host, mode=0o700)
        os.chmod(host, 0o700)  # whatever the umask
        try:
            secret = self.client.get(kube.SECRETS, src["secretName"], self.namespace)
        except kube.NotFound:
            if src.get("optional"):
                return host
            raise _SecretMissing(src["secretName"]) from None
        data = secret.get("data") or {}
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            raw = data.get(item["key"])
            if raw is None:
                if src.get("optional"):
                    continue
                raise _SecretMissing(src["secretName"])
            fd = os.open(os.path.join(host, item["path"]),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(raw))
        return host

    def _env(self, container: dict[str, Any], mapping: dict[str, str]) -> dict[str, str] | None:
        pythonpath = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH"))
                                     if p)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.root,
               "LANG": "C.UTF-8", "PYTHONPATH": pythonpath, **self.base_env}
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


class _SecretMissing(Exception):
    """A Secret volume's Secret or key is absent: the container cannot be configured."""


class _MountFailed(Exception):
    """A ``csi`` volume could not be mounted (the ``csi`` function raised)."""


def _log_tail(pod_dir: str) -> str:
    """The kubelet's FallbackToLogsOnError message: the log's last lines and bytes."""
    data = b""
    for name in ("stdout", "stderr"):
        with open(os.path.join(pod_dir, name), "rb") as f:
            data += f.read()
    lines = data.splitlines(keepends=True)[-LOG_LINES:]
    return b"".join(lines)[-LOG_BYTES:].decode(errors="replace")


def _epoch(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


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
