"""The Job result protocol: how a Job pod says how it ended, and how the manager reads it.

Every Job the manager makes (publish, SharedPVC materializer, ``source.pvc``
reader; their entry points are in ``jobs/``) ends the same way:

* exit status ``OK`` (0) on success, ``RETRYABLE`` (75, ``EX_TEMPFAIL`` of
  sysexits.h) for a failure another attempt may cure, ``TERMINAL`` (1) for
  one it cannot (the Jobs' ``podFailurePolicy`` fails the Job at once on 1);
* one JSON document written to ``--result-file``, which in a pod is
  ``TERMINATION_LOG``, the container's termination message: the result on
  success, ``{"error": {"reason", "message", "retryable"}}`` on failure.
  The kubelet keeps only the first ``MESSAGE_LIMIT`` bytes of it, so the
  document is written compact and an error's message is cut to fit.

The manager reads it back (``read``) from the Job's conditions and its pods'
container statuses into one typed ``Outcome``. Both halves live here, in
the contract layer, so the writer and the readers cannot drift apart. Pure
but for ``write``'s one file; no Kubernetes client: callers list the pods.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

OK = 0
TERMINAL = 1
RETRYABLE = 75  # EX_TEMPFAIL (sysexits.h): "try again later"
EX_TEMPFAIL = RETRYABLE

TERMINATION_LOG = "/dev/termination-log"  # the pods' terminationMessagePath
MESSAGE_LIMIT = 4096  # the kubelet keeps this much of a termination message
MAX_MESSAGE = 1000  # an error's message, as written
MAX_REASON = 64  # a reason as read back: it lands in a condition's CamelCase reason

# a Job's own state, from its conditions (publishjob.state, the embedded runner)
ACTIVE, COMPLETE, FAILED = "Active", "Complete", "Failed"
# an Outcome's kind
RUNNING, SUCCEEDED, FAILED_RETRYABLE, FAILED_TERMINAL = (
    "Running", "Succeeded", "FailedRetryable", "FailedTerminal")


class Failure(Protocol):
    """What every entry point's error carries (``PublishError``, ``JobError``, …)."""

    @property
    def reason(self) -> str: ...

    @property
    def retryable(self) -> bool | None: ...


class JobError(Exception):
    """A base for an entry point's own error: a message, a ``reason`` (a short CamelCase
    tag for the condition) and ``retryable`` (for the exit status)."""

    def __init__(self, message: str, *, reason: str, retryable: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


# -- the writing half: inside the Job's pod ------------------------------------------------


def exit_code(retryable: bool | None) -> int:
    return RETRYABLE if retryable else TERMINAL


def error(reason: str, message: str, retryable: bool | None) -> tuple[dict[str, Any], int]:
    """The result document of a failure and its exit status."""
    return ({"error": {"reason": reason, "message": message[:MAX_MESSAGE],
                       "retryable": bool(retryable)}}, exit_code(retryable))


def from_error(e: Failure) -> tuple[dict[str, Any], int]:
    """An entry point's error → (result document, exit status)."""
    return error(e.reason, str(e), e.retryable)


def encode(result: Mapping[str, Any], *, indent: bool = False) -> str:
    """The document as text: compact (a termination message), or indented for a person.

    A compact error still over ``MESSAGE_LIMIT`` has its message cut until it
    fits, so the kubelet never truncates it into invalid JSON."""
    if indent:
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    text = json.dumps(result, sort_keys=True, separators=(",", ":")) + "\n"
    err = result.get("error")
    while (over := len(text.encode()) - MESSAGE_LIMIT) > 0 and isinstance(err, Mapping) \
            and err.get("message"):
        message = str(err["message"])  # a character is at least one byte of the JSON
        err = dict(err, message=message[:max(0, len(message) - over)])
        text = json.dumps(dict(result, error=err), sort_keys=True, separators=(",", ":")) + "\n"
    return text


def write(result: Mapping[str, Any], path: str, *, indent_stdout: bool = False) -> None:
    """Write the result to ``path`` (a termination message: compact) or ``-`` (stdout)."""
    if path == "-":
        sys.stdout.write(encode(result, indent=indent_stdout))
        sys.stdout.flush()
        return
    with open(path, "w") as f:
        f.write(encode(result))


# -- the reading half: the manager -------------------------------------------------------


def state(job: Mapping[str, Any]) -> str:
    """``COMPLETE``, ``FAILED`` or ``ACTIVE`` from a Job's status conditions."""
    for c in _list((job.get("status") or {}).get("conditions")):
        if c.get("status") == "True" and c.get("type") in (COMPLETE, FAILED):
            return str(c["type"])
    return ACTIVE


def pod_selector(job: Mapping[str, Any]) -> str:
    """The label selector of a Job's pods (the Job controller sets ``job-name``)."""
    return f"job-name={job['metadata']['name']}"


@dataclass(frozen=True)
class Outcome:
    """How a Job ended, as far as its status and its pods' termination messages say.

    ``result``: a SUCCEEDED Job's result document (None while the kubelet has
    not reported one). ``reason``/``message``: a failed Job's, from its pod's
    error document when ``reported``, else from its ``Failed`` condition.
    """

    kind: str
    result: Mapping[str, Any] | None = None
    reason: str = ""
    message: str = ""
    reported: bool = False

    @property
    def running(self) -> bool:
        return self.kind == RUNNING

    @property
    def succeeded(self) -> bool:
        return self.kind == SUCCEEDED

    @property
    def failed(self) -> bool:
        return self.kind in (FAILED_RETRYABLE, FAILED_TERMINAL)

    @property
    def retryable(self) -> bool:
        return self.kind == FAILED_RETRYABLE

    def explain(self, what: str) -> tuple[str, str]:
        """(reason, message) of a failed Job for a condition or an Event; ``what`` names
        the Job ("publish Job mc-x-1"). A retryable error that still failed the Job
        ran out of retries, and says so."""
        if self.reported:
            message = self.message or f"{what} failed"
            return self.reason, f"{message} (retries exhausted)" if self.retryable else message
        return self.reason, f"{what} failed: {self.message}" if self.message else f"{what} failed"


def read(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> Outcome:
    """The outcome of ``job`` from its conditions and its pods (newest pod first wins)."""
    st = state(job)
    if st == ACTIVE:
        return Outcome(RUNNING)
    newest = sorted(pods, key=lambda p: str((p.get("metadata") or {}).get(
        "creationTimestamp", "")), reverse=True)
    if st == COMPLETE:
        return Outcome(SUCCEEDED, result=next(_documents(newest, success=True), None))
    for doc in _documents(newest, success=False):
        err = doc.get("error")
        if isinstance(err, Mapping) and err.get("reason"):
            return Outcome(FAILED_RETRYABLE if err.get("retryable") is True else FAILED_TERMINAL,
                           reason=str(err["reason"])[:MAX_REASON],
                           message=str(err.get("message") or "")[:MAX_MESSAGE], reported=True)
    for c in _list((job.get("status") or {}).get("conditions")):
        if c.get("type") == FAILED and c.get("status") == "True":
            return Outcome(FAILED_TERMINAL, reason=str(c.get("reason") or "JobFailed"),
                           message=str(c.get("message") or "")[:MAX_MESSAGE])
    return Outcome(FAILED_TERMINAL, reason="JobFailed")


def _documents(pods: Iterable[Mapping[str, Any]], *, success: bool
               ) -> Iterator[Mapping[str, Any]]:
    """The JSON documents in the pods' terminated containers' messages, in order; with
    ``success``, only those of containers that exited ``OK``. Unparsable ones are skipped:
    a pod killed before it wrote its result leaves nothing, or the kubelet's own text."""
    for pod in pods:
        for cs in _list((pod.get("status") or {}).get("containerStatuses")):
            term = (cs.get("state") or {}).get("terminated") or {}
            if not term or (success and term.get("exitCode") != OK):
                continue
            try:
                doc = json.loads(term.get("message") or "")
            except ValueError:
                continue
            if isinstance(doc, dict):
                yield doc


def _list(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


__all__ = ["ACTIVE", "COMPLETE", "EX_TEMPFAIL", "FAILED", "MESSAGE_LIMIT", "OK", "RETRYABLE",
           "TERMINAL", "TERMINATION_LOG", "Failure", "JobError", "Outcome", "encode", "error", "exit_code",
           "from_error", "pod_selector", "read", "state", "write"]
