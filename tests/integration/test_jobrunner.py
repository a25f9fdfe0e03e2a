"""The embedded mode's Job executor (controller/embedded/jobrunner.py) against the
real API server: what it writes must pass the API server's Job and Pod status
validation and be what the manager reads (the termination message on the Pod).

Jobs here run ``sh`` instead of the publish worker, to check the kubelet-like
parts directly: env from a Secret, an emptyDir path rewritten to a host dir,
the termination message, ``podFailurePolicy`` and ``backoffLimit``.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from api import names
from controller.embedded.jobrunner import JobRunner
from controller.models import publishjob as jobs
from kube import client as k
from tests import kubeenv

kube = kubeenv.kube


def _wait(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def cluster(kube: kubeenv.KubeEnv) -> Iterator[tuple[k.Kube, str]]:
    client = k.Kube.from_config(kube.kubeconfig)
    ns = f"jobs-{uuid.uuid4().hex[:6]}"
    client.create(k.Resource("", "v1", "namespaces", False),
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    client.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                              "metadata": {"name": "creds", "namespace": ns},
                              "data": {"token": base64.b64encode(b"s3cret").decode()}}, ns)
    yield client, ns
    client.close()


@pytest.fixture
def runner(cluster: tuple[k.Kube, str], tmp_path: Any) -> Iterator[JobRunner]:
    client, ns = cluster
    with JobRunner(client, ns, work_root=str(tmp_path / "jobs")) as r:
        yield r


def _job(ns: str, script: str, *, backoff: int = 0, labelled: bool = True) -> dict[str, Any]:
    name = f"j-{uuid.uuid4().hex[:8]}"
    labels = {names.LABEL_MANAGED: names.MANAGER} if labelled else {}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"backoffLimit": backoff,
                     "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                         "containerName": "c", "operator": "In", "values": [1]}}]},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "restartPolicy": "Never",
                         "containers": [{
                             "name": "c", "image": "unused", "command": ["sh", "-c", script, "sh"],
                             # an argument naming a mounted path is rewritten, as the
                             # kubelet's bind mounts make it appear
                             "args": ["/dev/termination-log"],
                             "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {
                                 "name": "creds", "key": "token"}}},
                                     {"name": "WORK", "value": "/work/sub"}],
                             "volumeMounts": [{"name": "w", "mountPath": "/work"}],
                             "terminationMessagePath": "/dev/termination-log"}],
                         "volumes": [{"name": "w", "emptyDir": {}}]}}}}


def _finished(client: k.Kube, ns: str, name: str) -> dict[str, Any] | None:
    job = client.get(k.JOBS, name, ns)
    return job if jobs.state(job) != "Active" else None


def _pods(client: k.Kube, ns: str, name: str) -> list[dict[str, Any]]:
    return client.list(k.PODS, ns, label_selector=f"job-name={name}")[0]


def test_success_writes_complete_and_termination_message(
        runner: JobRunner, cluster: tuple[k.Kube, str]) -> None:
    client, ns = cluster
    # the emptyDir path in env is rewritten to the host dir; the Secret resolved
    job = client.create(k.JOBS, _job(ns, 'mkdir -p "$WORK" && cd "$WORK" && '
                                         'printf \'{"token":"%s","cwd":"%s"}\' "$TOKEN" "$PWD" '
                                         '> "$1"'), ns)
    name = job["metadata"]["name"]
    done = _wait(lambda: _finished(client, ns, name))
    assert jobs.state(done) == "Complete"
    assert done["status"]["succeeded"] == 1
    pod = _pods(client, ns, name)[0]
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0
    assert '"token":"s3cret"' in term["message"]
    assert runner.root in term["message"]  # /work/sub became a dir under the runner's root


def test_failjob_exit_code_fails_at_once(runner: JobRunner, cluster: tuple[k.Kube, str]) -> None:
    client, ns = cluster
    job = client.create(k.JOBS, _job(ns, "exit 1", backoff=3), ns)
    done = _wait(lambda: _finished(client, ns, job["metadata"]["name"]))
    assert jobs.state(done) == "Failed"
    assert {c["type"]: c["reason"] for c in done["status"]["conditions"]}["Failed"] \
        == "PodFailurePolicy"
    assert len(_pods(client, ns, job["metadata"]["name"])) == 1  # not retried


def test_retryable_exit_retries_until_backoff_limit(
        runner: JobRunner, cluster: tuple[k.Kube, str]) -> None:
    client, ns = cluster
    job = client.create(k.JOBS, _job(ns, "exit 75", backoff=1), ns)
    done = _wait(lambda: _finished(client, ns, job["metadata"]["name"]))
    assert jobs.state(done) == "Failed"
    assert done["status"]["failed"] == 2
    assert {c["type"]: c["reason"] for c in done["status"]["conditions"]}["Failed"] \
        == "BackoffLimitExceeded"
    assert len(_pods(client, ns, job["metadata"]["name"])) == 2


def test_jobs_of_others_are_left_alone(runner: JobRunner, cluster: tuple[k.Kube, str]) -> None:
    client, ns = cluster
    job = client.create(k.JOBS, _job(ns, "exit 0", labelled=False), ns)
    mine = client.create(k.JOBS, _job(ns, "exit 0"), ns)
    _wait(lambda: _finished(client, ns, mine["metadata"]["name"]))
    assert _pods(client, ns, job["metadata"]["name"]) == []
    assert jobs.state(client.get(k.JOBS, job["metadata"]["name"], ns)) == "Active"


def test_secret_volume_is_private_files_gone_after(
        runner: JobRunner, cluster: tuple[k.Kube, str]) -> None:
    # the manager's Jobs take credentials as files of a mounted Secret (jobspec.SecretFiles)
    client, ns = cluster
    body = _job(ns, 'printf \'{"token":"%s","mode":"%s","dir":"%s"}\' "$(cat "$TOKEN_FILE")" '
                    '"$(stat -c %a "$TOKEN_FILE")" "$(stat -c %a "$(dirname "$TOKEN_FILE")")" '
                    '> "$1"')
    pod = body["spec"]["template"]["spec"]
    box = pod["containers"][0]
    box["env"] = [{"name": "TOKEN_FILE", "value": "/var/run/s/token"}]
    box["volumeMounts"].append({"name": "s", "mountPath": "/var/run/s", "readOnly": True})
    pod["volumes"].append({"name": "s", "secret": {"secretName": "creds", "defaultMode": 0o440}})
    job = client.create(k.JOBS, body, ns)
    done = _wait(lambda: _finished(client, ns, job["metadata"]["name"]))
    assert jobs.state(done) == "Complete"
    term = _pods(client, ns, job["metadata"]["name"])[0]["status"]["containerStatuses"][0]
    message = term["state"]["terminated"]["message"]
    assert '"token":"s3cret","mode":"600","dir":"700"' in message
    leftovers = [f for _, _, files in os.walk(runner.root) for f in files if f == "token"]
    assert leftovers == []  # removed with the attempt


def test_missing_secret_volume_is_a_config_error(
        runner: JobRunner, cluster: tuple[k.Kube, str]) -> None:
    client, ns = cluster
    body = _job(ns, "exit 0")
    body["spec"]["template"]["spec"]["volumes"].append(
        {"name": "s", "secret": {"secretName": "absent"}})
    body["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "s", "mountPath": "/var/run/s"})
    job = client.create(k.JOBS, body, ns)
    done = _wait(lambda: _finished(client, ns, job["metadata"]["name"]))
    assert jobs.state(done) == "Failed"
    term = _pods(client, ns, job["metadata"]["name"])[0]["status"]["containerStatuses"][0]
    assert term["state"]["terminated"]["reason"] == "CreateContainerConfigError"
