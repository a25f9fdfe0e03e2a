"""``source.upload`` in a Model reconcile: an upload-gateway session per publish key.

Where it sits: step 5 of ``reconciler.py`` for a model whose plan is
``upload``. ``ensure`` opens a gateway session (its token in a Secret in the
model's namespace) and writes WaitForUpload with the session's URL; it polls
the session until the gateway has verified and pushed the files (Publishing,
then Ready through ``publish.apply_result``, after ``spec.validation``'s check
when the Model has one: ``validation.finish``) or failed. An expired or vanished
session is replaced by a new one. The gateway itself lives in
``controller/upload``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from api import conditions as c
from api.model import REPUBLISHING, ModelView, ready_condition
from controller.errors import Result
from controller.models import publish, validation
from controller.models import publishjob as jobs
from controller.upload import client as uploads

log = logging.getLogger(__name__)


class Host(publish.Host, Protocol):
    """What an upload session needs of the reconciler: the publish path's, and the gateway."""

    uploads: uploads.Gateway | None


def ensure(host: Host, obj: dict[str, Any], p: jobs.Plan, key: str) -> Result:
    """``source.upload``: a gateway session for this publish key, polled until it publishes."""
    gw = host.uploads
    if gw is None:
        msg = "the manager has no upload gateway (--upload-gateway-url)"
        host.write_status(obj, {"phase": c.PENDING, "conditions": [
            c.condition("SourceResolved", False, "UploadGatewayNotConfigured", msg),
            c.condition("Ready", False, "UploadGatewayNotConfigured", msg)]})
        return Result()
    poll = gw.config.poll_interval
    view = ModelView.of(obj)
    sid = uploads.session_id(view.upload.get("url"))
    if not sid or view.publish_key != key:
        return new_session(host, obj, key, renewed=False)
    session = gw.status(sid)
    if session is None:
        log.info("upload session gone", extra={"model": view.full_name, "session": sid})
        return new_session(host, obj, key, renewed=True)
    phase = session.get("phase")
    if phase == "Ready" and isinstance(session.get("result"), dict) \
            and "digest" in session["result"]:
        # spec.validation's check first: the session (and its result) stays until the verdict
        res, decided = validation.finish(host, obj, dict(session["result"]), key, None)
        if decided:
            uploads.delete_secret(host.client, obj, host.settings)
        return res
    if phase == "Failed":
        err = session.get("error") or {}
        host.metrics.publishes.labels(view.kind, "failed").inc()
        host.set_failed(obj, str(err.get("reason") or "UploadPublishFailed"),
                        str(err.get("message") or "the upload gateway failed to publish"),
                        key=key, job=None)
        uploads.delete_secret(host.client, obj, host.settings)
        return Result()
    if phase == "Publishing":
        mark_publishing(host, obj, key, session)
        return Result(requeue_after=poll)
    left = float(session.get("expiresAt") or 0) - time.time()
    if left <= 0:
        return new_session(host, obj, key, renewed=True)
    mark_wait_for_upload(host, obj, key, view.upload, session.get("error"))
    return Result(requeue_after=min(poll, left + 0.5))


def new_session(host: Host, obj: dict[str, Any], key: str, renewed: bool) -> Result:
    assert host.uploads is not None
    session = host.uploads.create(uploads.model_name(obj), jobs.target(obj, host.settings),
                                  uploads.expected_format(obj))
    uploads.ensure_secret(host.client, uploads.token_secret(obj, host.settings, session))
    up = {"url": str(session["url"]),
          "tokenSecretRef": {"name": uploads.secret_name(obj)},
          "expiresAt": uploads.rfc3339(float(session["expiresAt"]))}
    log.info("upload session created", extra={
        "model": ModelView.of(obj).full_name, "session": session["id"], "renewed": renewed})
    host.recorder.record(obj, "Normal",
                         "UploadSessionRenewed" if renewed else "UploadSessionCreated",
                         f"upload to {up['url']} with the token in Secret "
                         f"{uploads.secret_name(obj)} until {up['expiresAt']}")
    mark_wait_for_upload(host, obj, key, up, None)
    return Result(requeue_after=host.uploads.config.poll_interval)


def mark_wait_for_upload(host: Host, obj: dict[str, Any], key: str, up: Mapping[str, Any],
                         error: dict[str, Any] | None) -> None:
    msg = f"waiting for files at {up.get('url')} (token in Secret " \
          f"{(up.get('tokenSecretRef') or {}).get('name')})"
    if error:  # a retryable publish failure: the session takes "complete" again
        msg = f"{msg}; the last publish failed: {str(error.get('message'))[:300]}"
    ready = c.condition("Ready", False, "WaitForUpload", msg)
    if ModelView.of(obj).digest:
        ready = c.condition("Ready", True, "WaitForUpload",
                            "serving the previous artifact while waiting for an upload")
    host.write_status(obj, {"phase": c.WAIT_FOR_UPLOAD, "upload": up,
                            "publish": {"key": key, "jobName": None}, "conditions": [
        c.condition("SourceResolved", True, "SourceValid", "the source is valid"),
        c.condition("Published", False, "WaitForUpload", msg), ready]})


def mark_publishing(host: Host, obj: dict[str, Any], key: str,
                    session: dict[str, Any]) -> None:
    msg = "the upload gateway is verifying and publishing the uploaded files"
    patch: dict[str, Any] = {"phase": c.PUBLISHING, "publish": {"key": key, "jobName": None},
                             "conditions": [
        c.condition("SourceResolved", True, "SourceValid", "the source is valid"),
        c.condition("Published", False, "Publishing", msg),
        ready_condition(ModelView.of(obj), "Publishing", msg, serving_reason=REPUBLISHING)]}
    progress = c.progress_from_event(session.get("progress") or {})
    if progress:
        patch["progress"] = progress
    if ModelView.of(obj).phase != c.PUBLISHING:
        host.recorder.record(obj, "Normal", "PublishStarted",
                             f"publishing the upload to {jobs.target(obj, host.settings)}")
    host.write_status(obj, patch)
