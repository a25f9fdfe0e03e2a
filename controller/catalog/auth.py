"""Who may read the catalog: TokenReview, then SubjectAccessReview, decisions cached briefly.

Every catalog request carries ``Authorization: Bearer <token>``: a token
this cluster's API server can review (a ServiceAccount token from the
TokenRequest API, typically). The API server decides twice:

1. ``TokenReview`` — is the token valid, and whose is it? No, or no
   header: 401.
2. ``SubjectAccessReview`` for that user — may they ``list`` (the model
   listing) or ``get`` (one model, its manifests and blobs; ``name`` is the
   model) the made-up subresource ``clustermodels/catalog`` in group
   ``modelcache.io``? No: 403. The ClusterRole ``modelcache:catalog:reader``
   grants exactly that. A subresource nobody serves means the role grants
   nothing on the cluster's own API, and ``resourceNames`` can narrow it to
   single models.

Both answers are cached for ``ttl`` seconds (keyed by a hash of the token,
never the token itself), so an import's thousands of blob requests cost a
handful of reviews, and a revoked token or binding stops working within
``ttl``. Fail closed: a review that cannot be had (the API server is down,
slow past ``timeout``, answers an error, or answers something that is not a
well-formed review: a non-JSON body, ``"allowed": "false"`` as a string, an
authenticated token without a username) is a 503, serves nothing, and is
not cached, so the next request asks again. Only a JSON ``true`` allows.
Tokens never reach a log line.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kube import client as kube

log = logging.getLogger(__name__)

GROUP = "modelcache.io"
RESOURCE = "clustermodels"
SUBRESOURCE = "catalog"
READER_ROLE = "modelcache:catalog:reader"


class Denied(Exception):
    """The request may not go on; ``status`` is 401, 403 or 503."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Identity:
    user: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict, hash=False, compare=False)


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authorizer:
    """TokenReview + SubjectAccessReview against one API server, with a TTL cache."""

    def __init__(self, client: kube.Kube, *, ttl: float = 10.0,
                 audiences: tuple[str, ...] = (), max_entries: int = 10000,
                 timeout: float = 5.0) -> None:
        self.client = client
        self.ttl = ttl
        self.timeout = timeout  # seconds one review may take; past it, 503
        self.audiences = audiences
        self.max_entries = max_entries
        self._tokens: dict[str, tuple[float, Identity | None]] = {}
        self._decisions: dict[tuple[str, str, str], tuple[float, bool]] = {}
        self._lock = threading.Lock()
        self.reviews = 0  # API calls made (tests and metrics read it)

    # -- the two questions -----------------------------------------------------

    def authenticate(self, token: str) -> Identity:
        if not token:
            raise Denied("a bearer token is required", 401)
        key = token_key(token)
        now = time.monotonic()
        with self._lock:
            hit = self._tokens.get(key)
        if hit is not None and hit[0] > now:
            ident = hit[1]
        else:
            ident = self._review_token(token)
            self._remember(self._tokens, key, (now + self.ttl, ident))
        if ident is None:
            raise Denied("the token is not valid", 401)
        return ident

    def authorize(self, ident: Identity, verb: str, name: str = "") -> None:
        key = (self._who(ident), verb, name)
        now = time.monotonic()
        with self._lock:
            hit = self._decisions.get(key)
        if hit is not None and hit[0] > now:
            allowed = hit[1]
        else:
            allowed = self._review_access(ident, verb, name)
            self._remember(self._decisions, key, (now + self.ttl, allowed))
        if not allowed:
            what = f"{verb} {RESOURCE}/{SUBRESOURCE}" + (f" {name!r}" if name else "")
            raise Denied(f"{ident.user} may not {what} (ClusterRole {READER_ROLE})", 403)

    def check(self, token: str, verb: str, name: str = "") -> Identity:
        ident = self.authenticate(token)
        self.authorize(ident, verb, name)
        return ident

    # -- API calls -----------------------------------------------------------------

    @staticmethod
    def _who(ident: Identity) -> str:
        return "\0".join((ident.user, ident.uid, *sorted(ident.groups)))

    def _remember(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        with self._lock:
            if len(table) >= self.max_entries:
                now = time.monotonic()
                for k in [k for k, v in table.items() if v[0] <= now]:
                    del table[k]
                if len(table) >= self.max_entries:
                    table.clear()  # a flood of distinct tokens: start over, never grow
            table[key] = value

    def _ask(self, res: kube.Resource, body: dict[str, Any], what: str) -> dict[str, Any]:
        """POST one review and return its ``status``; any failure is ``Denied(503)``."""
        try:
            answer: Any = self.client.request("POST", res.path(None), body=body,
                                              timeout=self.timeout)
        except kube.ApiError as e:
            # the message names the call, never the body (the token is in the body)
            log.warning("review failed", extra={"review": res.kind, "status": e.status})
            raise Denied(f"{what} could not be reviewed", 503) from e
        except ValueError as e:  # not JSON: whatever answered is not an API server
            log.warning("review answered no JSON", extra={"review": res.kind})
            raise Denied(f"{what} could not be reviewed", 503) from e
        finally:
            self.reviews += 1
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, dict):
            log.warning("review answered no status", extra={"review": res.kind})
            raise Denied(f"{what} could not be reviewed", 503)
        return status

    def _review_token(self, token: str) -> Identity | None:
        spec: dict[str, Any] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        status = self._ask(kube.TOKEN_REVIEWS, body, "the token")
        authenticated = status.get("authenticated", False)  # omitted when false
        if not isinstance(authenticated, bool):
            log.warning("token review answered no boolean")
            raise Denied("the token could not be reviewed", 503)
        if not authenticated:
            return None
        user = status.get("user")
        name = user.get("username") if isinstance(user, dict) else None
        if not isinstance(user, dict) or not isinstance(name, str) or not name:
            log.warning("token review answered no usable user")
            raise Denied("the token could not be reviewed", 503)
        try:
            return Identity(name, str(user.get("uid") or ""),
                            tuple(str(g) for g in user.get("groups") or ()),
                            {str(k): [str(x) for x in v]
                             for k, v in (user.get("extra") or {}).items()})
        except (AttributeError, TypeError) as e:  # groups or extra of the wrong shape
            log.warning("token review answered no usable user")
            raise Denied("the token could not be reviewed", 503) from e

    def _review_access(self, ident: Identity, verb: str, name: str) -> bool:
        attrs: dict[str, Any] = {"group": GROUP, "resource": RESOURCE,
                                 "subresource": SUBRESOURCE, "verb": verb}
        if name:
            attrs["name"] = name
        spec: dict[str, Any] = {"user": ident.user, "groups": list(ident.groups),
                                "resourceAttributes": attrs}
        if ident.uid:
            spec["uid"] = ident.uid
        if ident.extra:
            spec["extra"] = ident.extra
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": spec}
        status = self._ask(kube.SUBJECT_ACCESS_REVIEWS, body, "access")
        allowed = status.get("allowed")
        if not isinstance(allowed, bool):
            log.warning("access review answered no boolean", extra={"user": ident.user})
            raise Denied("access could not be reviewed", 503)
        return allowed
