"""Registry mirrors: content from a mirror first, the registry itself last.

Sits beside ``registry.RegistryClient``: a client with ``mirrors`` set asks
them, in order, for every blob and for a manifest pinned by digest, and
falls back to its own registry (the DMCR) when a mirror fails in any way:
refused connection, timeout, 404, 5xx, a wrong size or wrong bytes. Tags
never go to a mirror: the digest a tag names is the registry's to say.

Why a mirror cannot corrupt anything: it serves content addressed by
digest, and every byte it sends goes through the same ``PartialBlob``
hasher as the registry's; a blob is handed on only when it hashes to its
digest. A mirror that sent wrong bytes is skipped for ``QUARANTINE``
seconds by that client (the rest of a CLI or materializer pull; on a node,
every pull in that window) and logged; its bytes are dropped and the
next source starts from byte 0. A mirror that cannot be reached is skipped
for ``DOWN`` seconds, so a dead mirror costs one connect per window, not
one per blob.

Configuration follows containerd's ``hosts.toml`` (``certs.d`` layout:
``<dir>/<registry host>/hosts.toml``, ``<dir>/_default/hosts.toml`` for
any host) so one directory can serve both: ``[host."URL"]`` tables in
file order, each with ``capabilities`` (``pull``: blobs; ``resolve``:
also manifests by digest; a host without ``pull`` is not used),
``skip_verify``, ``ca`` (one file), ``client`` (one certificate/key pair),
``header`` (sent to that mirror only: its own credentials go here) and
``override_path``. Ignored: ``server`` (the upstream is the registry the
client was made for) and ``dial_timeout``. One key is ours:
``forward_credentials = true`` sends the registry's own credentials to
that mirror (a pass-through proxy such as Dragonfly's dfdaemon that
pulls with the caller's credentials); without it a mirror gets none.
As containerd does, each mirror request carries ``?ns=<registry host>``
(Spegel and Dragonfly read the upstream from it).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelpack.errors import (
    FormatError,
    IntegrityError,
    ModelPackError,
    RegistryError,
    StoreError,
)
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.store.blobs import PartialBlob

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
QUARANTINE = 600.0  # seconds a mirror that sent wrong bytes is skipped
DOWN = 30.0  # seconds a mirror that could not be reached is skipped
DEFAULT_HOST = "_default"


@dataclass(frozen=True)
class Mirror:
    """One mirror of a registry, as configured."""

    url: str  # as written in the configuration (for logs)
    base: str  # scheme://host[:port][/path] under which "/v2/..." paths go
    repo_prefix: str = ""  # put before the repository (a Harbor proxy-cache project)
    capabilities: frozenset[str] = frozenset({"pull", "resolve"})
    skip_verify: bool = False
    ca: str | None = None
    client_cert: tuple[str, str] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    forward_credentials: bool = False


def _endpoint(url: str, override_path: bool) -> tuple[str, str]:
    """(base, repo_prefix) for a mirror URL, with containerd's path rules.

    containerd appends ``/v2`` to the URL's path unless ``override_path``
    says the path is already the API root. Our client builds
    ``/v2/<repository>/...`` under a base, so an API root must end in
    ``/v2`` or hold ``/v2/`` (``https://harbor/v2/proxy-project``).
    """
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise FormatError(f"mirror {url!r}: expected http(s)://host[:port][/path]",
                          reason="InvalidMirror")
    path = u.path.rstrip("/")
    if not override_path and not path.endswith("/v2"):
        path += "/v2"
    origin = f"{u.scheme}://{u.netloc}"
    if path.endswith("/v2"):
        return origin + path[:-3], ""
    head, sep, tail = path.partition("/v2/")
    if not sep:
        raise FormatError(f"mirror {url!r}: override_path needs an API root with /v2 in it",
                          reason="InvalidMirror")
    return origin + head, tail.strip("/") + "/"


def mirror(url: str, *, capabilities: frozenset[str] = frozenset({"pull", "resolve"}),
           override_path: bool = False, skip_verify: bool = False, ca: str | None = None,
           client_cert: tuple[str, str] | None = None,
           headers: tuple[tuple[str, str], ...] = (),
           forward_credentials: bool = False) -> Mirror:
    base, prefix = _endpoint(url, override_path)
    return Mirror(url=url, base=base, repo_prefix=prefix, capabilities=capabilities,
                  skip_verify=skip_verify, ca=ca, client_cert=client_cert, headers=headers,
                  forward_credentials=forward_credentials)


def _one_file(value: Any, key: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise FormatError(f"{where}: {key} must be one file", reason="InvalidMirror")


def parse_hosts_toml(text: str, where: str = "hosts.toml") -> tuple[Mirror, ...]:
    """The mirrors of one ``hosts.toml``, in file order (the order they are tried)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"{where}: {e}", reason="InvalidMirror") from e
    out = []
    for url, spec in (doc.get("host") or {}).items():
        if not isinstance(spec, dict):
            raise FormatError(f"{where}: [host.{url!r}] is not a table", reason="InvalidMirror")
        caps = frozenset(spec.get("capabilities", ["pull", "resolve"]))
        if "pull" not in caps:
            continue  # a push-only host serves no pulls
        cert = spec.get("client")
        pair: tuple[str, str] | None = None
        if isinstance(cert, list) and cert and isinstance(cert[0], list):
            cert = cert[0] if len(cert) == 1 else None
        if isinstance(cert, list) and len(cert) == 2:
            pair = (str(cert[0]), str(cert[1]))
        elif cert is not None:
            raise FormatError(f"{where}: client must be one [cert, key] pair",
                              reason="InvalidMirror")
        headers = []
        for name, value in (spec.get("header") or {}).items():
            for v in value if isinstance(value, list) else [value]:
                headers.append((str(name), str(v)))
        out.append(mirror(url, capabilities=caps,
                          override_path=bool(spec.get("override_path", False)),
                          skip_verify=bool(spec.get("skip_verify", False)),
                          ca=_one_file(spec.get("ca"), "ca", where), client_cert=pair,
                          headers=tuple(headers),
                          forward_credentials=bool(spec.get("forward_credentials", False))))
    return tuple(out)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def to_hosts_toml(listed: tuple[Mirror, ...],
                  relocate: Callable[[str], str] = lambda path: path) -> str:
    """A ``hosts.toml`` that ``parse_hosts_toml`` reads back as ``listed``, in order.

    Why: a materializer Job runs in another pod, so the manager hands it the
    mirrors of its one registry as a file (of the Job's Secret: ``header``
    may carry a mirror's credentials). ``relocate`` maps each ``ca`` or
    ``client`` file to the path the reader will find it at.
    """
    lines = []
    for m in listed:
        table = f"host.{_toml_str(m.base + '/v2/' + m.repo_prefix)}"
        lines += [f"[{table}]", "  override_path = true",
                  f"  capabilities = [{', '.join(_toml_str(c) for c in sorted(m.capabilities))}]",
                  f"  skip_verify = {str(m.skip_verify).lower()}",
                  f"  forward_credentials = {str(m.forward_credentials).lower()}"]
        if m.ca:
            lines.append(f"  ca = {_toml_str(relocate(m.ca))}")
        if m.client_cert:
            cert, key = (_toml_str(relocate(p)) for p in m.client_cert)
            lines.append(f"  client = [[{cert}, {key}]]")
        if m.headers:
            lines.append(f"[{table}.header]")
            values: dict[str, list[str]] = {}
            for name, value in m.headers:
                values.setdefault(name, []).append(value)
            lines += [f"  {_toml_str(name)} = [{', '.join(_toml_str(v) for v in vs)}]"
                      for name, vs in values.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Mirrors:
    """The mirror lists of every registry host (``_default`` for any other)."""

    by_host: dict[str, tuple[Mirror, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.by_host.values())

    def of(self, host: str) -> tuple[Mirror, ...]:
        if host in self.by_host:
            return self.by_host[host]
        return self.by_host.get(DEFAULT_HOST, ())

    def attach(self, client: RegistryClient, host: str | None = None, *,
               timeout: tuple[float, float] = (5.0, 60.0)) -> RegistryClient:
        """Give ``client`` the mirrors of ``host`` (a reference's host; default its own)."""
        listed = self.of(host or client.host)
        client.mirrors = MirrorSet(client, host or client.host, listed, timeout=timeout) \
            if listed else None
        return client


def load(hosts_dir: str | None = None, flags: list[str] | tuple[str, ...] = ()) -> Mirrors:
    """The mirrors of a ``certs.d`` directory, then those of ``HOST=URL`` flags after them."""
    by_host: dict[str, list[Mirror]] = {}
    if hosts_dir:
        try:
            names = sorted(os.listdir(hosts_dir))
        except OSError as e:
            raise FormatError(f"mirror directory {hosts_dir}: {e.strerror}",
                              reason="InvalidMirror") from e
        for name in names:
            path = os.path.join(hosts_dir, name, "hosts.toml")
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as f:
                by_host.setdefault(name, []).extend(parse_hosts_toml(f.read(), path))
    for flag in flags:
        host, sep, url = flag.partition("=")
        if not sep or not host.strip() or not url.strip():
            raise FormatError(f"--registry-mirror {flag!r}: expected HOST=URL",
                              reason="InvalidMirror")
        by_host.setdefault(host.strip(), []).append(mirror(url.strip()))
    return Mirrors({h: tuple(ms) for h, ms in by_host.items()})


class MirrorSet:
    """The mirrors of one registry as one client sees them; thread-safe.

    Each mirror gets its own ``RegistryClient``: its own TLS settings, no
    credentials unless configured, ``ns`` on every request, and a small
    retry budget (the registry is the one worth waiting for).
    """

    def __init__(self, upstream: RegistryClient, registry_host: str,
                 mirrors: tuple[Mirror, ...], *, timeout: tuple[float, float]) -> None:
        self.upstream = upstream
        self.mirrors = mirrors
        self._lock = threading.Lock()
        self._skip_until: dict[str, float] = {}
        self._clients = [self._client(m, registry_host, timeout) for m in mirrors]

    def _client(self, m: Mirror, registry_host: str,
                timeout: tuple[float, float]) -> RegistryClient:
        u = urllib.parse.urlsplit(m.base)
        creds: dict[str, Any] = {}
        if m.forward_credentials:
            creds = {"username": self.upstream._credentials[0] if self.upstream._credentials
                     else None,
                     "password": self.upstream._credentials[1] if self.upstream._credentials
                     else None,
                     "token": self.upstream._bearer()}
        else:
            # no credentials of the registry's: an empty token keeps the client from
            # reading a docker config for the mirror's host
            creds = {"token": ""}
        c = RegistryClient(u.netloc, insecure=u.scheme == "http", ca_bundle=m.ca,
                           timeout=timeout, retries=1, **creds)
        c.base = m.base
        c.session.params = {"ns": registry_host}
        if m.skip_verify:
            c.session.verify = False
        if m.client_cert:
            c.session.cert = m.client_cert
        for name, value in m.headers:
            c.session.headers[name] = value
        return c

    def _usable(self, capability: str) -> list[tuple[Mirror, RegistryClient]]:
        now = time.monotonic()
        with self._lock:
            return [(m, c) for m, c in zip(self.mirrors, self._clients, strict=True)
                    if capability in m.capabilities and self._skip_until.get(m.url, 0.0) <= now]

    def _skip(self, m: Mirror, seconds: float, why: str, e: BaseException) -> None:
        with self._lock:
            self._skip_until[m.url] = time.monotonic() + seconds
        log.warning("registry mirror skipped", extra={"mirror": m.url, "why": why,
                                                      "seconds": seconds,
                                                      "error": str(e)[:200]})

    def _failed(self, m: Mirror, what: str, e: ModelPackError) -> None:
        """Log a mirror's failure; put it aside when the failure is its own doing."""
        if isinstance(e, IntegrityError):
            self._skip(m, QUARANTINE, "wrong content", e)
        elif isinstance(e, RegistryError) and e.status is None:
            self._skip(m, DOWN, "unreachable", e)
        else:  # a 404 or a 5xx: that blob is not there (yet); the next may be
            log.info("registry mirror failed; trying the next source",
                     extra={"mirror": m.url, "what": what, "error": str(e)[:200]})

    def get_manifest(self, ref: Reference) -> tuple[bytes, str, str] | None:
        """A manifest pinned by digest from the first mirror with ``resolve`` that has it."""
        if not ref.digest:
            return None
        for m, c in self._usable("resolve"):
            try:
                return c.get_manifest(Reference(c.host, m.repo_prefix + ref.repository,
                                                digest=ref.digest))
            except (RegistryError, IntegrityError) as e:
                self._failed(m, str(ref), e)
        return None

    def get_blob_bytes(self, repository: str, digest: str, limit: int) -> bytes | None:
        for m, c in self._usable("pull"):
            try:
                return c.get_blob_bytes(m.repo_prefix + repository, digest, limit)
            except (RegistryError, IntegrityError) as e:
                self._failed(m, digest, e)
        return None

    def download_blob(self, repository: str, digest: str, size: int, part: PartialBlob,
                      progress: Progress) -> bool:
        """Fill ``part`` from a mirror; True when it is all there and hashes to ``digest``.

        False: no mirror served it, and ``part`` is empty (or holds only the
        prefix it came with) for the registry to fill.
        """
        for m, c in self._usable("pull"):
            came_with = part.offset
            reported = 0

            def count(n: int) -> None:
                nonlocal reported
                reported += n
                progress(n)

            c.ranges = self.upstream.ranges
            try:
                c.download_blob(m.repo_prefix + repository, digest, size, part, count)
                got = "sha256:" + part.hasher.hexdigest() if part.offset == size else ""
                if got == digest:
                    return True
                if came_with:  # bytes from before: not this mirror's to answer for
                    e: ModelPackError = IntegrityError(f"blob {digest} from {m.url}, "
                                                       "resumed, hashes wrong")
                    log.info("resumed blob does not match; starting over",
                             extra={"digest": digest, "mirror": m.url})
                else:
                    raise IntegrityError(f"blob {digest} from {m.url} hashes to {got}")
            except StoreError:
                raise  # the disk's, not the mirror's
            except OSError as oe:
                if getattr(oe, "errno", None) is not None:
                    raise  # a local write error
                e = RegistryError(f"{m.url}: {oe}", retryable=True)
                self._failed(m, digest, e)
            except (RegistryError, IntegrityError) as ie:
                self._failed(m, digest, ie)
            progress(-reported)
            part.restart()  # nothing a failed mirror wrote is kept
        return False
