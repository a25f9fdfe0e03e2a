"""Per-model publish knobs: ``spec.publish.timeout`` / ``ttlAfterFinished`` become the
Job's ``activeDeadlineSeconds`` / ``ttlSecondsAfterFinished`` within the admin's maxima,
and an Ollama source's ``authSecretRef`` reaches the worker as Secret files only.
The real API server's side (CRD format, refusal) is tests/integration/test_publish_knobs.py.
"""

from __future__ import annotations

import argparse
import base64
from typing import Any

import pytest

from controller import main
from controller.models import policy, upstream
from controller.models import publishjob as jobs

SETTINGS = jobs.Settings(namespace="mc-system", registry="dmcr:5000",
                         active_deadline=86400, ttl_after_finished=3600)


def _model(publish: dict[str, Any] | None = None, source: dict[str, Any] | None = None,
           kind: str = "Model") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "m", "uid": "u-1", "generation": 1}
    if kind == "Model":
        meta["namespace"] = "team-a"
    spec: dict[str, Any] = {"source": source or {"ollama": {"model": "library/llama"}}}
    if publish is not None:
        spec["publish"] = publish
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def _job(obj: dict[str, Any], settings: jobs.Settings = SETTINGS) -> dict[str, Any]:
    return jobs.build(obj, jobs.plan(obj, settings), "k", settings)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("45m", 2700), ("2h", 7200), ("1h30m", 5400), ("1h0m5s", 3605), ("0s", 0)])
def test_durations(text: str, seconds: int) -> None:
    assert policy.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1d", "1.5h", "30m1h", "h", "5", "-1h", " 1h", 60])
def test_not_durations(text: Any) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        policy.duration(text)


def test_the_job_takes_the_models_timeout_and_ttl() -> None:
    spec = _job(_model({"timeout": "2h", "ttlAfterFinished": "10m"}))["spec"]
    assert spec["activeDeadlineSeconds"] == 7200
    assert spec["ttlSecondsAfterFinished"] == 600
    # "0s": delete the finished Job at once (not "unset")
    assert _job(_model({"ttlAfterFinished": "0s"}))["spec"]["ttlSecondsAfterFinished"] == 0
    # the knobs are not pod placement
    pod = _job(_model({"timeout": "2h"}))["spec"]["template"]["spec"]
    assert "timeout" not in pod and "ttlAfterFinished" not in pod


def test_without_the_knobs_the_managers_settings_hold() -> None:
    spec = _job(_model())["spec"]
    assert spec["activeDeadlineSeconds"] == 86400 and spec["ttlSecondsAfterFinished"] == 3600
    bare = _job(_model(), jobs.Settings(namespace="mc-system", registry="dmcr:5000"))["spec"]
    assert "activeDeadlineSeconds" not in bare  # the dataclass keeps "none"; the flag sets 24h


def test_above_the_maxima_is_refused_with_the_limit_named() -> None:
    p = policy.from_flags(max_timeout="6h", max_ttl="1h")
    assert policy.refusal(p, _model({"timeout": "6h", "ttlAfterFinished": "1h"})) is None
    why = policy.refusal(p, _model({"timeout": "6h1s"}))
    assert why == "spec.publish.timeout=6h1s exceeds the policy's maximum 6h"
    why = policy.refusal(p, _model({"ttlAfterFinished": "61m"}))
    assert why == "spec.publish.ttlAfterFinished=61m exceeds the policy's maximum 1h"
    assert "more than no time" in (policy.refusal(p, _model({"timeout": "0s"})) or "")
    assert "not a duration" in (policy.refusal(p, _model({"timeout": "1d"})) or "")
    # the admin's ClusterModels are not bounded
    assert policy.refusal(p, _model({"timeout": "100h"}, kind="ClusterModel")) is None
    # the defaults: 48h and 168h
    assert policy.refusal(policy.DEFAULT, _model({"timeout": "48h",
                                                  "ttlAfterFinished": "168h"})) is None
    assert policy.refusal(policy.DEFAULT, _model({"timeout": "49h"})) is not None


def test_manager_flags() -> None:
    ns = argparse.Namespace(publish_allow_node_selector=[], publish_allow_toleration=[],
                            publish_max_resource=[], job_max_timeout="3h",
                            job_max_ttl_after_finished="30m")
    p = main._publish_policy(ns)
    assert (p.max_timeout, p.max_ttl) == (10800, 1800)
    ns.job_max_timeout = "3 hours"
    with pytest.raises(SystemExit, match="job-max-timeout"):
        main._publish_policy(ns)
    assert main._active_deadline(argparse.Namespace(job_active_deadline="24h")) == 86400
    assert main._active_deadline(argparse.Namespace(job_active_deadline="0s")) is None
    with pytest.raises(SystemExit, match="job-active-deadline"):
        main._active_deadline(argparse.Namespace(job_active_deadline="1d"))


def test_ollama_auth_secret_reaches_the_worker_as_files() -> None:
    obj = _model(source={"ollama": {"model": "acme/private", "registry": "ollama.acme.io",
                                    "authSecretRef": {"name": "ollama-token"}}})
    p = jobs.plan(obj, SETTINGS)
    assert p.secret is not None and (p.secret.namespace, p.secret.name) == ("team-a",
                                                                             "ollama-token")
    # a token Secret: bearer; a username/password Secret: Basic; either key may be absent
    for data in ({"token": "t0k3n"}, {"username": "u", "password": "pw"}):
        b64 = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        jobs.check_keys(p.secret, b64)  # all optional: neither Secret is refused
    # lent at run time (controller/models/credentials.py), never copied into the Job's Secret
    lending = jobs.Settings(namespace="mc-system", registry="dmcr:5000",
                            credentials_url="https://mgr:5050")
    job = _job(obj, lending)
    (box,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in box["env"]}
    assert env["MODELCACHE_CREDENTIALS_URL"].startswith("https://mgr:5050/credentials/")
    assert jobs.lent(job) == p.secret
    assert "t0k3n" not in str(job)
    # a custom key for the token
    ref = {"name": "s", "key": "bearer"}
    keyed = jobs.plan(_model(source={"ollama": {"model": "m", "authSecretRef": ref}}), SETTINGS)
    assert keyed.secret is not None and keyed.secret.keys["MODELCACHE_HTTP_TOKEN"] == "bearer"


def test_ollama_without_auth_has_no_secret_and_upstream_probes_with_it() -> None:
    assert jobs.plan(_model(), SETTINGS).secret is None
    assert upstream._options("ollama", {}, SETTINGS, {}) == {"token": None}
    got = upstream._options("ollama", {}, SETTINGS, {"MODELCACHE_SOURCE_USERNAME": "u",
                                                     "MODELCACHE_SOURCE_PASSWORD": "p"})
    assert got == {"token": None, "username": "u", "password": "p"}
