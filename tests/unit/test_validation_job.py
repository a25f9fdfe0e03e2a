"""The ``spec.validation`` Job body, its bounds, its verdict, and the resolver's candidate rule.

The Job runs a tenant's image, so what it must not carry matters as much as
what it does: no credential, no service-account token, one attempt, the
user's timeout, and the candidate tree read-only through the node plugin.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from api import jobresult, names
from controller.metrics import Metrics
from controller.models import policy, validation
from controller.models import publishjob as jobs
from csi.resolvers.kube import model_entry, trim
from kube import client as kube

SETTINGS = jobs.Settings(namespace="mc-system", registry="dmcr:5000",
                         registry_secret="dmcr-push", report_url="http://manager:8080",
                         credentials_url="https://manager:8443")
DIGEST = "sha256:" + "ab" * 32
OLD = "sha256:" + "cd" * 32


def model(**validation_spec: Any) -> dict[str, Any]:
    spec = {"image": "python:3.12-slim", "command": ["python", "-c"],
            "args": ["import json,os; json.load(open(os.environ['MODELCACHE_MODEL_PATH']"
                     "+'/config.json'))"], **validation_spec}
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": "llama", "namespace": "team-a", "uid": "u-1", "generation": 2},
            "spec": {"source": {"huggingFace": {"repo": "org/llama"}}, "validation": spec}}


def test_job_runs_the_users_command_in_the_model_namespace_without_credentials():
    body = validation.build_job(model(), "key1", DIGEST, SETTINGS)
    meta, spec = body["metadata"], body["spec"]
    pod = spec["template"]["spec"]
    box = pod["containers"][0]
    assert meta["namespace"] == "team-a"
    assert meta["ownerReferences"] == [{"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                                        "name": "llama", "uid": "u-1", "controller": True}]
    assert meta["labels"]["app.kubernetes.io/component"] == "validation"
    assert spec["template"]["metadata"]["labels"] == meta["labels"]
    assert box["image"] == "python:3.12-slim"
    assert box["command"] == ["python", "-c"] and box["args"][0].startswith("import json")
    # nothing of the controller's: no Secret, no token, no service account, no Service env
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert pod["enableServiceLinks"] is False
    assert not any("secret" in v for v in pod["volumes"])
    assert {e["name"] for e in box["env"]} == {validation.PATH_ENV, validation.DIGEST_ENV}
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    # one attempt; the default timeout; the log's tail as a failure's message
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == validation.DEFAULT_TIMEOUT
    assert box["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert box["terminationMessagePath"] == jobresult.TERMINATION_LOG


def test_tree_is_the_candidate_digest_read_only_through_the_node_plugin():
    body = validation.build_job(model(mountPath="/models/llama"), "key1", DIGEST, SETTINGS)
    pod = body["spec"]["template"]["spec"]
    box = pod["containers"][0]
    assert pod["volumes"] == [{"name": "model", "csi": {
        "driver": names.CSI_DRIVER, "readOnly": True,
        "volumeAttributes": {names.ATTR_MODEL: "llama", names.ATTR_DIGEST: DIGEST}}}]
    assert box["volumeMounts"] == [{"name": "model", "mountPath": "/models/llama",
                                    "readOnly": True}]
    env = {e["name"]: e["value"] for e in box["env"]}
    assert env == {validation.PATH_ENV: "/models/llama", validation.DIGEST_ENV: DIGEST}
    default = validation.build_job(model(), "key1", DIGEST, SETTINGS)
    assert default["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0][
        "mountPath"] == "/model"


def test_timeout_and_resources_reach_the_job():
    res = {"limits": {"cpu": "2", "memory": "4Gi"}}
    body = validation.build_job(model(timeout="1h30m", resources=res), "k", DIGEST, SETTINGS)
    assert body["spec"]["activeDeadlineSeconds"] == 5400
    assert body["spec"]["template"]["spec"]["containers"][0]["resources"] == res


def test_job_name_follows_key_candidate_and_check():
    obj = model()
    name = validation.job_name(obj, "key1", DIGEST)
    assert name == validation.job_name(copy.deepcopy(obj), "key1", DIGEST)
    assert name.startswith("mcv-llama-") and len(name) <= 63
    assert validation.job_name(obj, "key2", DIGEST) != name
    assert validation.job_name(obj, "key1", OLD) != name
    assert validation.job_name(model(args=["other"]), "key1", DIGEST) != name
    long = model()
    long["metadata"]["name"] = "m" * 253
    assert len(validation.job_name(long, "key1", DIGEST)) <= 63


@pytest.mark.parametrize(("spec", "words"), [
    ({"timeout": "49h"}, "spec.validation.timeout=49h"),
    ({"resources": {"limits": {"nvidia.com/gpu": "1"}}}, "exceeds the policy's maximum 0"),
    ({"resources": {"requests": {"example.com/fpga": "1"}}}, "is not allowed"),
    ({"resources": {"requests": {"cpu": "lots"}}}, "is not a quantity"),
    ({"resources": {"claims": [{"name": "x"}]}}, "requests and limits only"),
])
def test_admin_bounds_refuse_a_bigger_validation(spec, words):
    why = validation.refusal(policy.DEFAULT, validation.spec_of(model(**spec)))
    assert why is not None and words in why


def test_admin_bounds_allow_what_they_list():
    pol = policy.from_flags(max_resources=["nvidia.com/gpu=1"], max_timeout="2h")
    spec = validation.spec_of(model(timeout="2h", resources={"limits": {"nvidia.com/gpu": 1}}))
    assert validation.refusal(pol, spec) is None
    assert "maximum 7200s" in str(validation.refusal(pol, {**spec, "timeout": "2h1s"}))


def test_only_namespaced_models_with_a_validation_are_validated():
    assert validation.wanted(model())
    assert not validation.wanted({**model(), "kind": "ClusterModel"})
    bare = model()
    del bare["spec"]["validation"]
    assert not validation.wanted(bare)


def test_failure_message_keeps_the_end_of_the_log_within_a_condition():
    log = "".join(f"line {i}\n" for i in range(500)) + "FATAL: config.json has no model_type"
    message = validation._with_tail("validation Job mcv-x failed (exit code 3)", log)
    assert message.startswith("validation Job mcv-x failed (exit code 3); log tail: ")
    assert message.endswith("FATAL: config.json has no model_type")
    assert len(message) <= 1000
    assert validation._with_tail("head", "  \n") == "head"
    assert validation.log_tail("é" * 1000, 7) == "é" * 3  # never half a character


def _validating(digest: str = DIGEST, repo: str = "models/team-a/llama",
                phase: str = "Validating") -> dict[str, Any]:
    return {"kind": "Model", "metadata": {"name": "llama", "namespace": "team-a"},
            "status": {"phase": phase, "validation": {
                "digest": digest, "reference": f"dmcr:5000/{repo}:gen-2", "jobName": "mcv-x"}}}


def test_resolver_knows_the_candidate_only_while_validating_in_its_own_repository():
    entry = model_entry(trim(_validating()))
    assert entry.problem  # not servable: no artifact yet
    assert entry.candidate is not None and str(entry.candidate) == \
        f"dmcr:5000/models/team-a/llama@{DIGEST}"
    # the same status once the validation is over names no candidate
    for phase in ("Failed", "Ready", "Publishing"):
        assert model_entry(trim(_validating(phase=phase))).candidate is None
    # a reference outside the model's own repository is never believed
    assert model_entry(trim(_validating(repo="models/team-b/secret"))).candidate is None
    assert model_entry(trim(_validating(digest="sha256:short"))).candidate is None


# -- one pass at a time, against a recorded API ------------------------------------------


class FakeApi:
    """Jobs and pods of one namespace as the API server would answer them."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []

    def get(self, res: Any, name: str, ns: str | None = None) -> dict[str, Any]:
        if name not in self.jobs:
            raise kube.NotFound("not found")
        return self.jobs[name]

    def create(self, res: Any, body: dict[str, Any], ns: str | None = None) -> dict[str, Any]:
        self.jobs[body["metadata"]["name"]] = dict(body, status={})
        return self.jobs[body["metadata"]["name"]]

    def list(self, res: Any, ns: str | None = None, **kw: Any) -> tuple[list[Any], str]:
        return self.pods, "1"


class FakeHost:
    def __init__(self, pol: policy.Policy = policy.DEFAULT) -> None:
        self.client = FakeApi()
        self.settings = jobs.Settings(namespace="mc-system", registry="dmcr:5000",
                                      publish_policy=pol)
        self.metrics = Metrics()
        self.events: list[str] = []
        self.recorder = self
        self.failed: list[tuple[str, str, str]] = []
        self.applied: list[str] = []

    def record(self, obj: Any, type_: str, reason: str, message: str) -> None:
        self.events.append(reason)

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]:
        status = dict(obj.get("status") or {}, **{k: v for k, v in patch.items()
                                                  if k != "conditions"})
        conds = {x["type"]: x for x in status.get("conditions") or []}
        conds.update({x["type"]: x for x in patch.get("conditions") or []})
        status["conditions"] = list(conds.values())
        obj["status"] = status
        return obj

    def set_failed(self, obj: Any, reason: str, message: str, cond: str = "Published",
                   key: str | None = None, job: str | None = "") -> None:
        self.failed.append((cond, reason, message))

    def apply_result(self, obj: Any, result: dict[str, Any], key: str, jname: Any) -> Any:
        self.applied.append(result["digest"])
        return validation.Result()

    def count(self, result: str) -> float:
        return self.metrics.registry.get_sample_value(
            "modelcache_validation_total", {"result": result}) or 0.0


RESULT = {"digest": DIGEST, "reference": "dmcr:5000/models/team-a/llama:gen-2"}


def finish(job: dict[str, Any], condition: str, reason: str) -> None:
    job["status"] = {"startTime": "2026-01-01T00:00:00Z", "conditions": [
        {"type": condition, "status": "True", "reason": reason,
         "lastTransitionTime": "2026-01-01T00:00:07Z"}]}


def test_pass_validating_then_ready_counted_once():
    host, obj = FakeHost(), model()
    res = validation.ensure(host, obj, RESULT, "key1", "mc-pub")
    assert res.requeue_after == validation.POLL
    (name,) = host.client.jobs
    assert obj["status"]["phase"] == "Validating"
    assert obj["status"]["validation"] == {"digest": DIGEST, "reference": RESULT["reference"],
                                           "jobName": name}
    finish(host.client.jobs[name], "Complete", "CompletionsReached")
    validation.ensure(host, obj, RESULT, "key1", "mc-pub")
    validation.ensure(host, obj, RESULT, "key1", "mc-pub")  # apply_result's write lost
    assert host.applied == [DIGEST, DIGEST] and not host.failed
    assert host.count("passed") == 1
    assert host.events == ["ValidationStarted", "ValidationPassed"]
    assert host.metrics.registry.get_sample_value(
        "modelcache_validation_duration_seconds_sum") == 7.0


@pytest.mark.parametrize(("reason", "want", "metric"), [
    ("DeadlineExceeded", "ValidationTimeout", "timeout"),
    ("BackoffLimitExceeded", "ValidationFailed", "failed")])
def test_failed_job_is_failed_with_reason_and_log_tail(reason, want, metric):
    host, obj = FakeHost(), model()
    validation.ensure(host, obj, RESULT, "key1", "mc-pub")
    (name,) = host.client.jobs
    finish(host.client.jobs[name], "Failed", reason)
    host.client.pods = [{"metadata": {"creationTimestamp": "2026-01-01T00:00:01Z"},
                         "status": {"containerStatuses": [{"state": {"terminated": {
                             "exitCode": 3, "message": "loading\nno tokenizer\n"}}}]}}]
    validation.ensure(host, obj, RESULT, "key1", "mc-pub")
    ((cond, got, message),) = host.failed
    assert (cond, got) == ("Validated", want)
    assert message.endswith("log tail: loading\nno tokenizer") and name in message
    assert host.count(metric) == 1 and not host.applied


def test_policy_refusal_makes_no_job():
    host, obj = FakeHost(), model(timeout="72h")
    validation.ensure(host, obj, RESULT, "key1", "mc-pub")
    assert not host.client.jobs
    assert host.failed[0][:2] == ("Validated", validation.POLICY_REASON)
