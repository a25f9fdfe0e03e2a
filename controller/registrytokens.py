"""The DMCR pull endpoint's token realm: who may read which repository, for how long.

Where it sits: distribution's read-only pull endpoint runs ``auth: token``
(``dmcr-config.yaml``, ``config-pull.yml``): a client without a token gets a
Bearer challenge naming this realm, asks it for a token for the scope it
needs (``repository:<name>:pull``), and presents the token, which
distribution checks against the signing certificate (``rootcertbundle``).
Every manager replica serves ``GET /token`` over HTTPS (the DMCR's
certificate, ``controller/dmcrtls.py``) on its ``token`` port.

Grants (``Issuer.grant``), decided from the caller's Basic credentials:

* the pull account (``--registry-pull-secret``, what node plugins hold):
  ``pull`` on every repository it asks for;
* username ``materializer`` and a *ticket* as the password: ``pull`` on the
  one repository the ticket names, until it expires (≤ ``MAX_TICKET_TTL``).
  A ticket is ``<payload>.<HMAC-SHA256>`` over ``{"ns", "repo", "exp"}`` with
  a key only the controller holds; the materializer Job's Secret in the
  workload's namespace carries it instead of the pull account
  (``delivery/materializer.py``), so whoever reads that Secret reads one
  model, for at most an hour;
* anything else (push, delete, ``registry:catalog:*``, another repository, an
  expired or forged ticket, a wrong password): no access granted (an empty
  grant, or 401 without valid credentials).

Keys (``ensure_keys``): Secret ``modelcache-dmcr-token`` in the controller's
namespace holds the RSA signing pair as ``tls.crt``/``tls.key`` (the DMCR
mounts only ``tls.crt``) and the ticket key ``ticket.key``; the first
replica creates it (the loser of the create race reads the winner's), so
the plain ``daemonset/`` manifests need no generator. Keys and tickets are
never logged.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kube import certs
from kube import client as kube
from kube.httpreply import reply

log = logging.getLogger(__name__)

SERVICE = "modelcache-dmcr"  # distribution's auth.token.service: the token's audience
ISSUER = "modelcache-controller"  # auth.token.issuer
MATERIALIZER = "materializer"  # the username a ticket is presented with
MAX_TICKET_TTL = 3600.0
TOKEN_TTL = 300  # seconds a token is valid; the client asks again after
IDLE_TIMEOUT = 10.0  # seconds a silent connection is kept (the socket's own timeout)
CERT_KEY, SIGNING_KEY, TICKET_KEY = "tls.crt", "tls.key", "ticket.key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    cert: bytes  # PEM: distribution's rootcertbundle, and each token's x5c
    key: bytes  # PEM, RSA: signs the tokens
    ticket_key: bytes  # HMAC key of the materializers' tickets


def new_keys(now: dt.datetime | None = None) -> Keys:
    """An RSA signing pair (distribution checks RS256 against the x5c certificate) and a
    ticket key. The certificate lives ten years: a new one needs the DMCR restarted."""
    cert, key = certs.new_rsa_signer(ISSUER, now or dt.datetime.now(dt.UTC),
                                     dt.timedelta(days=3650))
    return Keys(cert, key, secrets.token_bytes(32))


def ensure_keys(client: kube.Kube, namespace: str, name: str) -> Keys:
    """The keys in Secret ``namespace/name``; made here when it is absent."""
    for _ in range(3):
        try:
            data = client.get(kube.SECRETS, name, namespace).get("data") or {}
            return Keys(*(base64.b64decode(data[k]) for k in (CERT_KEY, SIGNING_KEY, TICKET_KEY)))
        except kube.NotFound:
            pass
        keys = new_keys()
        try:
            client.create(kube.SECRETS, {
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/name": "modelcache",
                                        "app.kubernetes.io/component": "dmcr"}},
                "data": {k: base64.b64encode(v).decode() for k, v in (
                    (CERT_KEY, keys.cert), (SIGNING_KEY, keys.key),
                    (TICKET_KEY, keys.ticket_key))}}, namespace)
            log.info("registry token keys created", extra={"secret": f"{namespace}/{name}"})
            return keys
        except kube.Conflict:
            continue  # another replica made it first: read theirs
    raise kube.Conflict(f"secret {namespace}/{name}: could not be read or made")


# -- tickets ---------------------------------------------------------------------------


def make_ticket(key: bytes, namespace: str, repository: str, expires: float) -> str:
    """A ticket for ``pull`` on ``repository`` until ``expires`` (unix seconds)."""
    payload = _b64(json.dumps({"ns": namespace, "repo": repository, "exp": int(expires)},
                              separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())}"


def check_ticket(key: bytes, ticket: str, now: float) -> str | None:
    """The repository a ticket opens; None when forged, expired, or too long-lived."""
    payload, _, mac = ticket.partition(".")
    try:
        want = hmac.new(key, payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(want, _unb64(mac)):
            return None
        claims = json.loads(_unb64(payload))
        exp, repo = float(claims["exp"]), str(claims["repo"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if exp <= now or exp > now + MAX_TICKET_TTL:
        return None
    return repo


# -- grants and tokens -----------------------------------------------------------------


def parse_scopes(scopes: list[str]) -> list[tuple[str, str, set[str]]]:
    """``repository:models/a:pull,push`` (space-separated, repeatable) → (type, name, actions)."""
    out = []
    for scope in scopes:
        for one in scope.split():
            kind, _, rest = one.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                out.append((kind, name, set(filter(None, actions.split(",")))))
    return out


class Unauthorized(Exception):
    """No valid credentials: the realm answers 401."""


class Issuer:
    """Grants and signs tokens. ``pull_login``: the pull account (username, password) now,
    or None when there is none; read on each request (a rotated Secret takes effect)."""

    def __init__(self, keys: Keys, pull_login: Callable[[], tuple[str, str] | None],
                 clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.pull_login = pull_login
        self.clock = clock
        self._signer = serialization.load_pem_private_key(keys.key, None)
        assert isinstance(self._signer, rsa.RSAPrivateKey)
        self._x5c = base64.b64encode(
            x509.load_pem_x509_certificate(keys.cert).public_bytes(serialization.Encoding.DER)
        ).decode()

    def grant(self, authorization: str, scopes: list[str]) -> tuple[str, list[dict[str, Any]]]:
        """(subject, access) for a request's ``Authorization`` and scopes; Unauthorized
        without valid credentials. Only ``pull`` on repositories is ever granted."""
        user, password = _basic(authorization)
        if user == MATERIALIZER:
            only = check_ticket(self.keys.ticket_key, password, self.clock())
            if only is None:
                raise Unauthorized("ticket refused")
            allowed: Callable[[str], bool] = lambda repo: repo == only  # noqa: E731
        else:
            login = self.pull_login()
            if login is None or not (hmac.compare_digest(user.encode(), login[0].encode())
                                     and hmac.compare_digest(password.encode(),
                                                             login[1].encode())):
                raise Unauthorized("credentials refused")
            allowed = lambda repo: True  # noqa: E731
        access = [{"type": kind, "name": name, "actions": ["pull"]}
                  for kind, name, actions in parse_scopes(scopes)
                  if kind == "repository" and "pull" in actions and allowed(name)]
        return user, access

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(self.clock())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + TOKEN_TTL,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        assert isinstance(self._signer, rsa.RSAPrivateKey)
        sig = self._signer.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64(sig)}"


def _basic(authorization: str) -> tuple[str, str]:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("no basic credentials")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode() \
            .partition(":")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise Unauthorized("malformed credentials") from e
    if not sep:
        raise Unauthorized("malformed credentials")
    return user, password


# -- the realm's HTTP server -----------------------------------------------------------


def create_server(listen: tuple[str, int], issuer: Issuer, ctx: ssl.SSLContext | None,
                  lender: Callable[[BaseHTTPRequestHandler], None] | None = None
                  ) -> ThreadingHTTPServer:
    """``GET /token?service=…&scope=…`` over TLS (``ctx``; None: plain, tests only), and
    ``GET /credentials/<job>``, a publish Job's source credential, when ``lender`` is
    given (``controller/models/credentials.py``)."""

    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_TIMEOUT  # a silent client is dropped

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if lender is not None and url.path.startswith("/credentials/"):
                lender(self)
                return
            if url.path != "/token":
                reply(self, 404, b"not found\n")
                return
            q = urllib.parse.parse_qs(url.query)
            if q.get("service", [SERVICE]) != [SERVICE]:
                reply(self, 400, b"unknown service\n")
                return
            try:
                subject, access = issuer.grant(self.headers.get("Authorization", ""),
                                               q.get("scope", []))
            except Unauthorized:
                reply(self, 401, b"", headers={"WWW-Authenticate":
                                               'Basic realm="modelcache-dmcr"'})
                return
            token = issuer.token(subject, access)
            body = json.dumps({"token": token, "access_token": token,
                               "expires_in": TOKEN_TTL}).encode()
            reply(self, 200, body, "application/json")

    server = ThreadingHTTPServer(listen, Handler)
    server.daemon_threads = True
    if ctx is not None:
        server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    return server


# -- what the manager runs -------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    listen: tuple[str, int]
    namespace: str
    secret: str = "modelcache-dmcr-token"
    pull_secret: str | None = None  # the pull account's Secret (username/password)
    pull_ttl: float = 30.0  # seconds the pull account's Secret is reused


class Realm:
    """The token realm of one manager replica: its keys, the pull account, its server."""

    def __init__(self, client: kube.Kube, cfg: Config) -> None:
        self.client = client
        self.cfg = cfg
        self._login: tuple[float, tuple[str, str] | None] = (-1e18, None)
        self.issuer: Issuer | None = None
        self.server: ThreadingHTTPServer | None = None
        self._ctx: ssl.SSLContext | None = None
        self._served = b""
        # publish Jobs' source credentials, served on this HTTPS listener (app.Manager)
        self.lender: Callable[[BaseHTTPRequestHandler], None] | None = None

    def pull_login(self) -> tuple[str, str] | None:
        if not self.cfg.pull_secret:
            return None
        at, login = self._login
        if time.monotonic() - at < self.cfg.pull_ttl:
            return login
        try:
            data = self.client.get(kube.SECRETS, self.cfg.pull_secret,
                                   self.cfg.namespace).get("data") or {}
            login = (base64.b64decode(data["username"]).decode(),
                     base64.b64decode(data["password"]).decode())
        except (kube.NotFound, KeyError):
            login = None
        self._login = (time.monotonic(), login)
        return login

    def start(self, bundle: Any) -> None:
        """Serve with ``bundle`` (a ``kube.certs.Bundle``: the DMCR's certificate)."""
        self.issuer = Issuer(ensure_keys(self.client, self.cfg.namespace, self.cfg.secret),
                             self.pull_login)
        self._ctx = certs.server_context(bundle.cert, bundle.key)
        self._served = bundle.cert
        self.server = create_server(self.cfg.listen, self.issuer, self._ctx, self.lender)
        threading.Thread(target=self.server.serve_forever, daemon=True,
                         name="registry-tokens").start()
        log.info("registry token realm listening",
                 extra={"listen": f"{self.cfg.listen[0]}:{self.server.server_address[1]}"})

    def reload(self, bundle: Any) -> None:
        """A renewed certificate: served from the next connection on."""
        if self._ctx is not None and bundle.cert != self._served:
            certs.load_chain(self._ctx, bundle.cert, bundle.key)
            self._served = bundle.cert

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


__all__ = ["Config", "Realm", "ISSUER", "MATERIALIZER", "MAX_TICKET_TTL", "SERVICE", "Issuer", "Keys",
           "Unauthorized", "check_ticket", "create_server", "ensure_keys", "make_ticket",
           "new_keys", "parse_scopes"]
