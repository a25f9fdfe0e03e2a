"""The Job result protocol (api/jobresult.py): what a Job pod writes is what the manager reads."""

from __future__ import annotations

import json
from typing import Any

from api import jobresult


def _job(state: str | None, reason: str = "", message: str = "") -> dict[str, Any]:
    conds = [] if state is None else [{"type": state, "status": "True", "reason": reason,
                                       "message": message}]
    return {"metadata": {"name": "mc-x-1"}, "status": {"conditions": conds}}


def _pod(created: str, code: int, message: str) -> dict[str, Any]:
    return {"metadata": {"creationTimestamp": created}, "status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": code, "message": message}}}]}}


class _Err(Exception):
    reason = "Locked"
    retryable = True


def test_exit_codes_and_error_documents():
    assert (jobresult.OK, jobresult.TERMINAL, jobresult.RETRYABLE) == (0, 1, 75)
    doc, code = jobresult.from_error(_Err("held by another"))
    assert code == jobresult.RETRYABLE
    assert doc == {"error": {"reason": "Locked", "message": "held by another", "retryable": True}}
    doc, code = jobresult.error("PathNotFound", "x" * 5000, False)
    assert code == jobresult.TERMINAL and len(doc["error"]["message"]) == jobresult.MAX_MESSAGE


def test_written_document_fits_the_termination_message(tmp_path):
    doc = {"error": {"reason": "Big", "message": "\u00e9" * 1000, "retryable": False}}
    text = jobresult.encode(doc)
    assert len(text.encode()) <= jobresult.MESSAGE_LIMIT
    assert json.loads(text)["error"]["reason"] == "Big"
    path = tmp_path / "termination-log"
    jobresult.write({"digest": "sha256:ab", "files": 2}, str(path))
    assert path.read_text() == '{"digest":"sha256:ab","files":2}\n'
    assert jobresult.encode({"a": 1}, indent=True) == '{\n  "a": 1\n}\n'


def test_read_running_and_succeeded():
    assert jobresult.read(_job(None), []).running
    done = _job("Complete")
    out = jobresult.read(done, [_pod("2024-01-01T00:00:01Z", 1, '{"error": {}}'),
                                _pod("2024-01-01T00:00:00Z", 0, '{"digest": "sha256:ab"}')])
    assert out.succeeded and out.result == {"digest": "sha256:ab"}
    assert jobresult.read(done, [_pod("t", 0, "not json")]).result is None


def test_read_failed_from_the_newest_pods_error():
    failed = _job("Failed", "PodFailurePolicy")
    err = json.dumps({"error": {"reason": "Unavailable", "message": "gateway down",
                                "retryable": True}})
    old = json.dumps({"error": {"reason": "Old", "message": "", "retryable": False}})
    out = jobresult.read(failed, [_pod("2024-01-01T00:00:00Z", 1, old),
                                  _pod("2024-01-01T00:00:09Z", 75, err)])
    assert out.failed and out.retryable and out.reported
    assert out.explain("PVC reader Job r") == ("Unavailable", "gateway down (retries exhausted)")
    terminal = jobresult.read(failed, [_pod("t", 1, old)])
    assert terminal.kind == jobresult.FAILED_TERMINAL
    assert terminal.explain("publish Job p") == ("Old", "publish Job p failed")


def test_read_failed_without_a_result_falls_back_to_the_condition():
    out = jobresult.read(_job("Failed", "DeadlineExceeded", "too slow"), [_pod("t", 137, "")])
    assert out.kind == jobresult.FAILED_TERMINAL and not out.reported
    assert out.explain("publish Job p") == ("DeadlineExceeded", "publish Job p failed: too slow")
    assert jobresult.read(_job("Failed"), []).explain("Job j") == ("JobFailed", "Job j failed")
