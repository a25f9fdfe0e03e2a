"""A publish Job's source credential, lent at run time: ``GET /credentials/<job>``.

Where it sits: a tenant's Secret (a Model's ``authSecretRef``, a catalog
source's ``tokenSecretRef``) is never copied into the controller's namespace.
The publish Job carries only *which* Secret and keys (the annotation
``publishjob.lend`` writes, on a Job in the controller's namespace that no
tenant may edit) and, at start, asks the manager for the values
(``jobs/secretfiles.borrow``). This module answers that request:

1. the bearer must be the Job's report token (an HMAC of the Job's name under
   the manager's report key, ``publishjob.report_token``): another Job's token
   or a forged one → 403; nothing else the worker sends is trusted;
2. the Job is read from the API server (a per-request get, not the cache: a
   finished Job lends nothing): absent → 404, finished → 410;
3. the Model the Job's labels name must still exist with the Job's uid
   (→ 410), and the Secret must pass the same checks as at Job creation
   (``publishjob.check_secret``: own namespace for a Model; opt-in label and
   not one of the controller's own in the controller's namespace) → 403;
4. the Secret is read by one get, and only the keys the annotation maps are
   returned, under their env var names, as JSON, ``Cache-Control: no-store``.

Served on the token realm's HTTPS listener (``registrytokens.create_server``,
the DMCR certificate, which Jobs trust through ``ca.crt`` of their Secret);
the plain report listener serves it only when the manager runs without that
realm: the embedded demo and the tests (``app.Manager``). Values are never
logged, only the Job's name and the outcome.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
from http.server import BaseHTTPRequestHandler
from typing import Any

from api import names
from controller.errors import PermanentError
from controller.models import publishjob as jobs
from kube import client as kube
from kube.httpreply import reply
from kube.informer import Informer

log = logging.getLogger(__name__)

PREFIX = "/credentials/"
_JOB = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class Lender:
    """Answers ``GET /credentials/<job>`` for the publish Jobs of ``settings.namespace``."""

    def __init__(self, client: kube.Kube, settings: jobs.Settings,
                 models: dict[str, Informer]) -> None:
        self.client = client
        self.settings = settings
        self.models = models  # "Model" / "ClusterModel" → its informer

    def answer(self, job: str, authorization: str) -> tuple[int, dict[str, str] | str]:
        """(HTTP status, the env vars to set or a short reason); pure of any value in logs."""
        if not _JOB.fullmatch(job):
            return 404, "unknown job"
        token = authorization.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(token.encode(),
                                   jobs.report_token(self.settings, job).encode()):
            return 403, "forbidden"
        try:
            obj = self.client.get(kube.JOBS, job, self.settings.namespace, timeout=(5.0, 15.0))
        except kube.NotFound:
            return 404, "unknown job"
        if jobs.state(obj) != "Active":
            return 410, "the job has finished"
        use = jobs.lent(obj)
        if use is None:
            return 404, "the job borrows no credential"
        model = self._model(obj)
        if model is None:
            return 410, "the job's model is gone"
        try:
            secret = self.client.get(kube.SECRETS, use.name, use.namespace, timeout=(5.0, 15.0))
        except kube.NotFound:
            return 404, "the secret is absent"
        try:
            jobs.check_secret(model, use, {"metadata": secret.get("metadata") or {}},
                              self.settings)
            data = dict(secret.get("data") or {})
            jobs.check_keys(use, data)
            out = {env: base64.b64decode(str(data[key]), validate=True).decode()
                   for env, key in use.keys.items() if key in data}
        except PermanentError as e:
            return 403, e.reason or "refused"
        except (binascii.Error, UnicodeDecodeError):
            return 403, "the secret's value is not text"
        return 200, out

    def _model(self, job: dict[str, Any]) -> dict[str, Any] | None:
        lab = (job.get("metadata") or {}).get("labels") or {}
        kind = lab.get(names.LABEL_KIND, "")
        informer = self.models.get(kind)
        if informer is None:
            return None
        obj = informer.get((lab.get(names.LABEL_NAMESPACE, ""), lab.get(names.LABEL_NAME, "")))
        if obj is None or str(obj["metadata"].get("uid")) != lab.get(names.LABEL_UID):
            return None
        return dict(obj, kind=kind)

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        """One request on a server's handler (its path starts with ``PREFIX``)."""
        job = handler.path[len(PREFIX):].split("?", 1)[0]
        try:
            code, body = self.answer(job, handler.headers.get("Authorization", ""))
        except kube.ApiError as e:
            log.warning("credential not lent", extra={"job": job[:63], "error": str(e)[:200]})
            code, body = 503, "the API server did not answer"
        log.info("credential request", extra={"job": job[:63], "code": code})
        payload = json.dumps(body if code == 200 else {"reason": body}).encode()
        reply(handler, code, payload, "application/json", headers={"Cache-Control": "no-store"})


__all__ = ["Lender", "PREFIX"]
