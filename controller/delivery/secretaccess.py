"""Admission for Models: a Model may name only Secrets its author may read.

Where it sits: the webhook's ``Admission.review`` hands every Model the
API server sends it (CREATE naming a Secret, and an UPDATE that changes a source naming one:
webhookconfig's ``models.modelcache.io`` entry selects exactly those) to
``Checker.check``. The attack it stops: a tenant who may create Models but
not read Secrets writes a Model whose ``authSecretRef`` names a Secret of
the namespace and whose source URL is their own server; the publish Job
would send that Secret there as a bearer token. So each newly named Secret
(on UPDATE: each Secret whose source changed) is put to a SubjectAccessReview for the requesting user (the
AdmissionReview's ``userInfo``: user, uid, groups, extra), asking ``get``
on that one Secret; not allowed → a 403 denial naming the Secret.

Fails closed: a review that cannot be made, times out, answers an error or
anything but a boolean ``allowed`` is a 503 denial (retry later); no
decision is cached, so each admission asks afresh. A Model without Secret
references, or an update that keeps its source, is never sent here by the API
server, and is admitted here without a review if it is.

Only namespaced Models: a ClusterModel's Secrets live in the controller's
namespace, where only Secrets an admin labelled are lent
(``controller.secretrefs``), and ClusterModels are written by admins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kube import client as kube

log = logging.getLogger(__name__)

Obj = dict[str, Any]

# every Secret reference in a Model's spec (crds/modelcache.io_models.yaml; a unit test walks
# the CRD's schema so a new ``*SecretRef`` field cannot be missed here or in the webhook's
# matchConditions, which are built from this list)
SECRET_REF_PATHS: tuple[tuple[str, ...], ...] = (
    ("source", "huggingFace", "authSecretRef"),
    ("source", "ollama", "authSecretRef"),
    ("source", "http", "authSecretRef"),
    ("source", "s3", "authSecretRef"),
)
REVIEW_TIMEOUT = 2.0  # the API server gives the whole admission webhookconfig.TIMEOUT_SECONDS


class Refused(Exception):
    """The admission is denied: ``code`` 403 (not allowed) or 503 (cannot tell now)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class User:
    """The requesting user, as the AdmissionReview's ``userInfo`` names them."""

    name: str
    uid: str
    groups: tuple[str, ...]
    extra: dict[str, list[str]]


def _at(spec: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(spec, dict):
            return None
        spec = spec.get(key)
    return spec


def _spec(obj: Any) -> Any:
    return obj.get("spec") if isinstance(obj, dict) else None


def to_review(obj: Any, old: Any) -> dict[str, str]:
    """The Secrets to review, each with the field that names it: every one ``obj`` names
    on CREATE (``old`` None); on UPDATE those whose source changed at all (another
    Secret, or the same Secret sent to another URL). An unchanged source was reviewed
    when it was written."""
    spec, before = _spec(obj), _spec(old) if old is not None else None
    out: dict[str, str] = {}
    for path in SECRET_REF_PATHS:
        ref = _at(spec, path)
        if not (isinstance(ref, dict) and isinstance(ref.get("name"), str) and ref["name"]):
            continue
        if old is not None and _at(before, path[:-1]) == _at(spec, path[:-1]):
            continue
        out.setdefault(ref["name"], "spec." + ".".join(path))
    return out


def requesting_user(info: Any) -> User | None:
    """``userInfo`` as a ``User``; None without a usable username."""
    if not isinstance(info, dict) or not isinstance(info.get("username"), str) \
            or not info["username"]:
        return None
    groups, extra = info.get("groups") or [], info.get("extra") or {}
    if not isinstance(groups, list) or not isinstance(extra, dict):
        return None
    return User(info["username"], str(info.get("uid") or ""), tuple(str(g) for g in groups),
                {str(k): [str(x) for x in v] for k, v in extra.items() if isinstance(v, list)})


def sar_body(user: User, namespace: str, secret: str) -> Obj:
    spec: Obj = {"user": user.name, "groups": list(user.groups),
                 "resourceAttributes": {"namespace": namespace, "verb": "get", "group": "",
                                        "resource": "secrets", "name": secret}}
    if user.uid:
        spec["uid"] = user.uid
    if user.extra:
        spec["extra"] = user.extra
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": spec}


class Checker:
    """``check`` one Model admission request; SubjectAccessReviews through ``client``."""

    def __init__(self, client: kube.Kube, timeout: float = REVIEW_TIMEOUT) -> None:
        self.client = client
        self.timeout = timeout

    def check(self, req: Obj) -> None:
        """Return when every newly named Secret is readable by the requester; else
        ``Refused``."""
        old = req.get("oldObject") if req.get("operation") == "UPDATE" else None
        refs = to_review(req.get("object") or {}, old)
        if not refs:
            return  # nothing new to lend: no review, no API call
        ns = str(req.get("namespace") or "")
        user = requesting_user(req.get("userInfo"))
        if not ns or user is None:
            raise Refused("modelcache: a Model naming a Secret needs a namespaced request "
                          "from a known user", 403)
        for name, field in sorted(refs.items()):
            if not self.may_get(user, ns, name):
                raise Refused(f'{user.name} may not get Secret "{name}" in namespace "{ns}" '
                              f"({field}): a Model may name only Secrets its author can "
                              "read", 403)

    def may_get(self, user: User, namespace: str, secret: str) -> bool:
        """The API server's answer; ``Refused`` (503) when it gives none."""
        what = f'cannot check access to Secret "{secret}" now'
        try:
            answer: Any = self.client.request(
                "POST", kube.SUBJECT_ACCESS_REVIEWS.path(None),
                body=sar_body(user, namespace, secret), timeout=self.timeout)
        except kube.ApiError as e:
            status = getattr(e, "status", 0)
            raise Refused(f"{what} (API server answered {status}); retry" if status else
                          f"{what} (API server unreachable); retry", 503) from e
        except ValueError as e:  # a body that is not JSON
            raise Refused(f"{what} (API server answered garbage); retry", 503) from e
        status = answer.get("status") if isinstance(answer, dict) else None
        allowed = status.get("allowed") if isinstance(status, dict) else None
        if not isinstance(allowed, bool):
            log.warning("access review answered no boolean", extra={"namespace": namespace})
            raise Refused(f"{what} (the review answered no decision); retry", 503)
        return allowed
