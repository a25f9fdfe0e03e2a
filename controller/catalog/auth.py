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
``ttl``. A failed review call (the API server is down) is a 503 and is not
cached. Tokens never reach a log line.
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
                 audiences: tuple[str, ...] = (), max_entries: int = 10000) -> None:
        self.client = client
        self.ttl = ttl
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

    def _review_token(self, token: str) -> Identity | None:
        spec: dict[str, Any] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            answer = self.client.create(kube.TOKEN_REVIEWS, body)
        except kube.ApiError as e:
            # the message names the call, never the body (the token is in the body)
            log.warning("token review failed", extra={"status": e.status})
            raise Denied("the token could not be reviewed", 503) from e
        finally:
            self.reviews += 1
        status = answer.get("status") or {}
        if not status.get("authenticated"):
            return None
        user = status.get("user") or {}
        return Identity(str(user.get("username") or ""), str(user.get("uid") or ""),
                        tuple(str(g) for g in user.get("groups") or ()),
                        {str(k): [str(x) for x in v] for k, v in (user.get("extra") or {}).items()})

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
        try:
            answer = self.client.create(kube.SUBJECT_ACCESS_REVIEWS, body)
        except kube.ApiError as e:
            log.warning("access review failed", extra={"status": e.status, "user": ident.user})
            raise Denied("access could not be reviewed", 503) from e
        finally:
            self.reviews += 1
        return bool((answer.get("status") or {}).get("allowed"))
