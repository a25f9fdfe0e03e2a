"""``source.upload``: the manager's side of the upload gateway (controller/upload/).

For a Model with ``source.upload`` the reconciler asks the gateway for a
session per publish key (``POST /v1/sessions`` with the admin token; the
session's reference is the Model's usual registry target), keeps the session
token in a Secret beside the Model (owned by it; key ``token``), and writes
``status.upload {url, tokenSecretRef, expiresAt}`` with ``status.publish.key``.
The session id is the last segment of ``status.upload.url``: a restarted
manager finds the session there and does not make a second one.

The session publishes by itself once the user's upload completes; the
manager polls ``GET /v1/uploads/<id>`` every ``poll_interval`` seconds with
the *admin* token, not the session's: a session token stops working at
``expiresAt``, and an upload completed just before that may still be
publishing after it, whose result must not be lost.

Expiry: a session whose token expired before anything was published is
replaced by a new one (new token in the same Secret, new URL in the status,
event ``UploadSessionRenewed``), so a Model waiting for an upload always
shows a usable URL; files sent to the old session are not carried over. A
session the gateway no longer knows (reaped, or the gateway's root lost) is
replaced the same way.
"""

from __future__ import annotations

import base64
import datetime
import logging
from dataclasses import dataclass
from typing import Any

import requests

from api import model, names
from controller.errors import TemporaryError
from controller.models import publishjob as jobs
from kube import client as kube

log = logging.getLogger(__name__)
TOKEN_KEY = names.UPLOAD_TOKEN_KEY


@dataclass(frozen=True)
class Config:
    """What the manager's ``--upload-*`` flags decide."""

    url: str  # how the manager reaches the gateway (admin calls, polling)
    admin_token: str
    ttl_seconds: float = 24 * 3600.0
    poll_interval: float = 5.0
    timeout: float = 10.0


class Gateway:
    """The upload gateway's admin API; every failure leaves as ``TemporaryError``."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None
              ) -> requests.Response:
        try:
            return requests.request(
                method, f"{self.config.url.rstrip('/')}{path}", json=body,
                headers={"Authorization": f"Bearer {self.config.admin_token}"},
                timeout=self.config.timeout)
        except requests.RequestException as e:
            raise TemporaryError(f"upload gateway unreachable: {type(e).__name__}",
                                 reason="UploadGatewayUnavailable") from e

    def create(self, model: str, reference: str, expected_format: str = "Auto"
               ) -> dict[str, Any]:
        """A new session: ``{id, url, token, expiresAt}``; the publish verifies
        ``expected_format`` (the Model's spec.format) as a publish Job does."""
        resp = self._call("POST", "/v1/sessions", {
            "model": model, "reference": reference, "ttlSeconds": self.config.ttl_seconds,
            "format": expected_format})
        if resp.status_code != 201:
            raise _error(resp, "creating an upload session")
        out: dict[str, Any] = resp.json()
        return out

    def status(self, session_id: str) -> dict[str, Any] | None:
        """The session's ``{phase, result, error, progress, expiresAt, …}``; None if unknown."""
        resp = self._call("GET", f"/v1/uploads/{session_id}")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise _error(resp, "reading an upload session")
        out: dict[str, Any] = resp.json()
        return out


def _error(resp: requests.Response, what: str) -> TemporaryError:
    # the gateway's body is untrusted: only its reason header and a cut of the text go on
    reason = resp.headers.get("X-Error-Reason", "")[:64]
    return TemporaryError(f"{what}: HTTP {resp.status_code} {reason} {resp.text[:200]!r}",
                          reason="UploadGatewayError")


def session_id(url: str | None) -> str:
    return (url or "").rstrip("/").rsplit("/", 1)[-1] if url else ""


def model_name(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return str(meta["name"]) if model.model_kind(obj) == "ClusterModel" \
        else f"{meta['namespace']}/{meta['name']}"


def expected_format(obj: dict[str, Any]) -> str:
    """The Model's declared spec.format, which the gateway's publish verifies."""
    return str((obj.get("spec") or {}).get("format") or "Auto")


def secret_namespace(obj: dict[str, Any], settings: jobs.Settings) -> str:
    # a ClusterModel's Secrets live in the controller's namespace (DESIGN.md)
    return settings.namespace if model.model_kind(obj) == "ClusterModel" \
        else str(obj["metadata"]["namespace"])


def secret_name(obj: dict[str, Any]) -> str:
    prefix = "cluster-" if model.model_kind(obj) == "ClusterModel" else ""
    return f"{prefix}{obj['metadata']['name']}"[:240].rstrip("-.") + "-upload-token"


def rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(float(epoch), datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def token_secret(obj: dict[str, Any], settings: jobs.Settings, session: dict[str, Any]
                 ) -> dict[str, Any]:
    """The Secret holding a session's token, owned by the model (GC'd with it)."""
    meta = obj["metadata"]
    owner = {"apiVersion": str(obj.get("apiVersion") or kube.MODELS.api_version),
             "kind": model.model_kind(obj), "name": meta["name"], "uid": meta["uid"],
             "controller": True}
    labels = {k: v for k, v in jobs.labels(obj, None).items()}
    labels["app.kubernetes.io/component"] = "upload"
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": secret_name(obj), "namespace": secret_namespace(obj, settings),
                         "labels": labels, "annotations": {names.ANN_SESSION: str(session["id"])},
                         "ownerReferences": [owner]},
            "data": {TOKEN_KEY: base64.b64encode(str(session["token"]).encode()).decode()}}


def ensure_secret(client: kube.Kube, body: dict[str, Any]) -> None:
    """Create the token Secret, or point the existing one at the new session."""
    meta = body["metadata"]
    try:
        client.create(kube.SECRETS, body, meta["namespace"])
    except kube.Conflict:
        client.patch(kube.SECRETS, meta["name"], {
            "metadata": {"annotations": meta["annotations"], "labels": meta["labels"]},
            "data": body["data"]}, meta["namespace"])


def delete_secret(client: kube.Kube, obj: dict[str, Any], settings: jobs.Settings) -> None:
    try:
        client.delete(kube.SECRETS, secret_name(obj), secret_namespace(obj, settings),
                      propagation=None)
    except kube.NotFound:
        pass
    except kube.ApiError as e:
        log.info("upload token secret not deleted", extra={"secret": secret_name(obj),
                                                           "error": str(e)[:200]})
