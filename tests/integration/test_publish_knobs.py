"""Per-model publish knobs and publish progress, end to end on the real kube-apiserver.

One manager process with ``--embedded-jobs`` (its publish Jobs run as local
processes) and tight admin maxima (``--job-max-timeout=1h``,
``--job-max-ttl-after-finished=2h``):

* the CRD refuses a knob that is not a duration; a Model above a maximum is
  Failed with ``PublishPolicyDenied`` and gets no Job; within them, its Job
  carries ``activeDeadlineSeconds``/``ttlSecondsAfterFinished`` from the spec;
* an Ollama registry behind Basic auth (a real docker-registry with htpasswd,
  tests/servers/ollama.py's layout): the Model with ``authSecretRef`` becomes
  Ready, the one without fails on the registry's 401;
* a Hugging Face repo served at 2 MiB/s (the hub's ``rate`` knob):
  ``status.progress`` is read while it publishes and moves at least twice
  before Ready; then the manager's /metrics counts the Jobs and the publishes.
"""

from __future__ import annotations

import base64
import os
import re
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cli.local import registry as localregistry
from kube import client as k
from modelpack.oci.registry import RegistryClient
from tests import kubeenv, modelgen
from tests.integration.test_controller import (
    SYSTEM_NS,
    ManagerProcess,
    ensure_namespace,
    hf_model,
    install_crds,
    jobs_of,
    phase_is,
    wait_for,
)
from tests.servers import ollama

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube
pytestmark = pytest.mark.timeout(240)

SECRETS = k.Resource("", "v1", "secrets")


@pytest.fixture(scope="module")
def private_ollama() -> Iterator[localregistry.LocalRegistry]:
    with localregistry.running(username="puller", password="ollama-pw") as reg:
        yield reg


@pytest.fixture(scope="module")
def env(kube: kubeenv.KubeEnv, registry: localregistry.LocalRegistry, hub_server: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    ensure_namespace(client, SYSTEM_NS)
    ns = f"knobs-{uuid.uuid4().hex[:6]}"
    ensure_namespace(client, ns)
    work = tmp_path_factory.mktemp("knobs")
    m = ManagerProcess(kube, registry.host, hub_server.url, str(work / "manager.log"),
                       extra=["--embedded-jobs", str(work / "jobs"),
                              "--job-max-timeout=1h", "--job-max-ttl-after-finished=2h",
                              "--progress-interval", "0.2"]).start()
    try:
        yield {"client": client, "ns": ns, "manager": m, "work": str(work)}
    finally:
        m.stop()
        client.close()


def _model(name: str, ns: str, source: dict[str, Any],
           publish: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": source}
    if publish is not None:
        spec["publish"] = publish
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _published(m: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in m["status"]["conditions"] if c["type"] == "Published")


def test_crd_refuses_a_knob_that_is_not_a_duration(env: dict[str, Any]) -> None:
    src = {"http": {"url": "https://models.example/m.gguf"}}
    for bad in ({"timeout": "1d"}, {"timeout": "1.5h"}, {"timeout": "0s"},
                {"ttlAfterFinished": "forever"}, {"ttlAfterFinished": ""}):
        with pytest.raises(k.ApiError) as e:
            env["client"].create(k.MODELS, _model("bad", env["ns"], src, bad), env["ns"])
        assert e.value.status == 422, (bad, e.value)
        assert "spec.publish." in str(e.value), (bad, str(e.value))


def test_above_the_admins_maxima_the_model_is_refused(env: dict[str, Any]) -> None:
    src = {"http": {"url": "https://models.example/m.gguf"}}
    for name, publish, field in (("long", {"timeout": "1h1m"}, "timeout"),
                                 ("kept", {"ttlAfterFinished": "3h"}, "ttlAfterFinished")):
        made = env["client"].create(k.MODELS, _model(name, env["ns"], src, publish), env["ns"])
        m = wait_for(phase_is(env["client"], env["ns"], name, "Failed"), 60, what="Failed")
        cond = _published(m)
        assert cond["reason"] == "PublishPolicyDenied", (cond, env["manager"].logs())
        assert f"spec.publish.{field}=" in cond["message"] and "maximum" in cond["message"]
        assert jobs_of(env["client"], made["metadata"]["uid"]) == []


def test_the_job_gets_the_models_deadline_and_ttl(env: dict[str, Any]) -> None:
    src = {"http": {"url": "https://models.example/m.gguf"}}
    made = env["client"].create(k.MODELS, _model(
        "timed", env["ns"], src, {"timeout": "45m", "ttlAfterFinished": "2h"}), env["ns"])
    jobs = wait_for(lambda: jobs_of(env["client"], made["metadata"]["uid"]), 60,
                    what="a publish Job")
    assert jobs[0]["spec"]["activeDeadlineSeconds"] == 2700
    assert jobs[0]["spec"]["ttlSecondsAfterFinished"] == 7200


def test_private_ollama_registry_needs_the_secret(env: dict[str, Any], tmp_path: Any,
                                                  private_ollama: localregistry.LocalRegistry
                                                  ) -> None:
    client, ns = env["client"], env["ns"]
    modelgen.make_gguf_model(str(tmp_path / "g"))
    pusher = RegistryClient(private_ollama.host, insecure=True, username="puller",
                            password="ollama-pw")
    ollama.push_model(pusher, "acme/private", "1b", str(tmp_path / "g" / "model.gguf"))
    client.create(SECRETS, {"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": "ollama-login"},
                            "data": {"username": base64.b64encode(b"puller").decode(),
                                     "password": base64.b64encode(b"ollama-pw").decode()}}, ns)
    src = {"model": "acme/private", "tag": "1b", "registry": private_ollama.host}
    client.create(k.MODELS, _model("with-login", ns, {"ollama": {
        **src, "authSecretRef": {"name": "ollama-login"}}}), ns)
    client.create(k.MODELS, _model("anonymous", ns, {"ollama": src}), ns)
    ok = wait_for(phase_is(client, ns, "with-login", "Ready", "Failed"), 120, what="Ready")
    assert ok["status"]["phase"] == "Ready", (ok["status"], env["manager"].logs())
    assert ok["status"]["resolved"]["format"] == "GGUF"
    bad = wait_for(phase_is(client, ns, "anonymous", "Failed"), 120, what="Failed")
    cond = _published(bad)
    assert cond["reason"] == "Unauthorized", cond
    assert "401" in cond["message"] or "nauthorized" in cond["message"], cond


def _metrics(manager: ManagerProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{manager.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(modelcache_publish_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_progress_moves_while_publishing_and_metrics_count_it(
        env: dict[str, Any], hub_server: Any, tmp_path: Any) -> None:
    client, ns = env["client"], env["ns"]
    before = _metrics(env["manager"])
    root = str(tmp_path / "big")
    modelgen.make_big_model(root, 1, 12 << 20)
    repo = f"acme/slow-{ns}"
    hub_server.add_repo(repo, root)
    shard = next(n for n in os.listdir(root) if n.endswith(".safetensors"))
    hub_server.knobs.rate[shard] = 2 << 20  # 12 MiB at 2 MiB/s: about 6 s of transfer
    try:
        client.create(k.MODELS, hf_model("slow", ns, repo), ns)
        seen: list[dict[str, Any]] = []

        def ready() -> dict[str, Any] | None:
            m = client.get(k.MODELS, "slow", ns)
            st = m.get("status") or {}
            p = st.get("progress")
            if st.get("phase") != "Ready" and p and (not seen or p != seen[-1]):
                seen.append(p)
            return m if st.get("phase") in ("Ready", "Failed") else None
        m = wait_for(ready, 120, interval=0.1, what="Ready")
    finally:
        hub_server.knobs.rate.pop(shard, None)
    assert m["status"]["phase"] == "Ready", (m["status"], env["manager"].logs())
    done = [p.get("bytesDone", 0) for p in seen]
    moving = [p for p in seen if 0 < p.get("bytesDone", 0) < p.get("bytesTotal", 0)]
    assert len(moving) >= 2, seen
    assert done == sorted(done), seen  # it only goes forward
    assert all(p["bytesTotal"] >= 12 << 20 for p in moving), seen
    assert any(p.get("bytesPerSecond", 0) > 0 for p in moving), seen
    assert any(p.get("etaSeconds", 0) > 0 for p in moving), seen
    assert all(p.get("bytesPerSecond", 0) < 8 << 20 for p in moving), seen  # throttled
    after = wait_for(lambda: (lambda a: a if a.get(
        'modelcache_publish_finished_total{kind="Model",result="ready"}', 0) >
        before.get('modelcache_publish_finished_total{kind="Model",result="ready"}', 0)
        else None)(_metrics(env["manager"])), 30, what="the finished counter")
    key = 'modelcache_publish_jobs_created_total{kind="Model"}'
    assert after.get(key, 0) >= before.get(key, 0) + 1, (before, after)
    assert after.get('modelcache_publish_duration_seconds_count{kind="Model"}', 0) >= 1
    size = m["status"]["artifact"]["sizeBytes"]
    assert size >= 12 << 20
    grown = after['modelcache_publish_bytes_total{kind="Model"}'] - before.get(
        'modelcache_publish_bytes_total{kind="Model"}', 0)
    assert grown >= size, (before, after)
    reports = urllib.request.urlopen(
        f"http://127.0.0.1:{env['manager'].port}/metrics", timeout=5).read().decode()
    accepted = re.search(r'modelcache_progress_reports_total\{result="accepted"\} ([0-9.e+]+)',
                         reports)
    assert accepted and float(accepted.group(1)) >= 2, reports[-2000:]
