"""``ModelView.servable_digest`` and ``ready_condition``: the one rule every consumer reads.

The integration test (tests/integration/test_last_good_artifact.py) drives real
re-publishes; here the rule itself, state by state, and two pure consumers (the
webhook's plan, the node's ``model_entry``) on a model whose re-publish failed.
"""

from __future__ import annotations

from typing import Any

from api import inject
from api import names as c
from api.model import REPUBLISHING, SERVING_PREVIOUS, ModelView, ready_condition
from api.podspec import Ref
from csi.resolvers.kube import model_entry, trim

A = "sha256:" + "a" * 64


def model(phase: str, *, digest: str | None = A, ready: str | None = None,
          deleting: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if digest:
        status["artifact"] = {"digest": digest, "reference": f"reg:5000/models/ns/m@{digest}"}
    if ready:
        status["conditions"] = [{"type": "Ready", "status": ready, "reason": "X"}]
    meta: dict[str, Any] = {"name": "m", "namespace": "ns"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"kind": "Model", "metadata": meta, "spec": {}, "status": status}


def test_the_rule_state_by_state() -> None:
    cases = [
        (model("Ready"), A),  # phase Ready (statuses written without conditions too)
        (model("Publishing", ready="True"), A),  # Republishing
        (model("Failed", ready="True"), A),  # ServingPreviousArtifact
        (model("Pending", ready="True"), A),  # a Secret gone: still serving
        (model("Publishing", digest=None, ready="False"), ""),  # a first publish
        (model("Failed", digest=None, ready="False"), ""),  # a failed first publish
        (model("Failed", ready="False"), ""),  # written before the rule
        (model("Ready", deleting=True), ""),
        (model("Deleting", ready="True"), ""),
        (model("Ready", digest="sha256:xyz"), ""),  # malformed: nothing a pull could use
    ]
    for obj, want in cases:
        view = ModelView.of(obj)
        assert view.servable_digest == want, obj["status"]
        assert view.serving == bool(want)
        # the node's informers keep what the rule reads
        assert ModelView.of(trim(obj)).servable_digest == want, obj["status"]


def test_ready_condition_names_the_artifact_it_keeps_serving() -> None:
    cond = ready_condition(ModelView.of(model("Ready")), "ChecksumMismatch", "bad bytes")
    assert (cond["status"], cond["reason"]) == ("True", SERVING_PREVIOUS)
    assert A in cond["message"] and "bad bytes" in cond["message"]
    cond = ready_condition(ModelView.of(model("Ready")), "Publishing", "Job j",
                           serving_reason=REPUBLISHING)
    assert (cond["status"], cond["reason"]) == ("True", REPUBLISHING)
    first = ready_condition(ModelView.of(model("Publishing", digest=None)), "Publishing", "j")
    assert (first["status"], first["reason"], first["message"]) == ("False", "Publishing", "j")
    # and what it writes is what the rule reads
    failed = model("Failed")
    failed["status"]["conditions"] = [ready_condition(ModelView.of(failed), "R", "m")]
    assert ModelView.of(failed).servable_digest == A


def test_consumers_serve_a_failed_republish() -> None:
    failed = model("Failed", ready="True")
    planned, warnings = inject.plan([Ref("Model", "m")], "ns", lambda ref: failed,
                                    workload_mode="SharedPVC", default_mode="NodeCache")
    assert planned[0].volume_source()["persistentVolumeClaim"]["claimName"] == c.pvc_name(A)
    assert warnings == [f"Model m is Failed: pods get its last published artifact {A} "
                        "(see its Ready condition)"]
    entry = model_entry(trim(failed))
    assert not entry.problem and entry.digest == A and entry.phase == "Failed"
