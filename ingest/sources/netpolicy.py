"""Which network addresses a source may reach: the admin's deny list.

A source URL is chosen by whoever writes a Model, and the publish Job runs
inside the cluster: without a check, ``http://169.254.169.254/...`` (cloud
metadata), loopback or the service network (the API server) would be
fetched by the controller's own Job. The publish Job installs a ``Policy``
(``jobs/publish.py``: on by default, ``--deny-source-cidr`` adds networks,
``--allow-private-sources`` turns it off for development and tests); so does
the manager (``controller/main.py``), for its upstream probes and catalog
listings. Without an installed policy (the ``modelcache pack`` CLI on a
user's own machine, library use) nothing is denied.

Two lines of defence. First, a URL check (``check``): the host is resolved
and refused if *any* of its addresses is in a denied network, before any
connection, with a clear message: the HTTP sources check every request,
each redirect hop included (``httpio.TimeoutSession.send``), the S3,
Hugging Face, Ollama and catalog endpoints when the source or client is
made. Second, the connect guard: a ``sys.addaudithook`` hook on
``socket.connect`` refuses a connection whose *actual* peer address is
denied, whatever library opens it. That covers what the URL check cannot
see: redirects followed inside ``huggingface_hub``/``httpx``, ``boto3`` or
the registry client, and DNS rebinding (a name that answered an allowed
address to the check and a denied one to the connect). The hook raises
``SourceAddressDenied``, which is no ``OSError``: the libraries neither
retry it nor try the next address, and each source's error mapping hands it
on as it is (``denial``), so the Model fails terminally with that reason.

Where the guard applies. In the publish Job, the whole process
(``install(..., trusted=...)``), source threads and all: only the Job's own
endpoints (the DMCR, the report URL) are exempt, by host *and* port, the
host resolved again at connect time (its name is the admin's, not a
tenant's). In the manager, which must reach the API server, only inside
``guarded()`` blocks: the upstream probe and the catalog listing run there,
each in one thread (a contextvar does not follow work handed to other
threads; neither code path hands any). Stated limits: a source may reach the
exempt DMCR host:port itself (anonymously: no credential is sent to a
source); sockets opened outside Python's ``socket`` module (none of our
libraries does) are not seen; the chart's egress policy stays the outer line.
"""
from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any

from ingest.sources import base

REASON = "SourceAddressDenied"
DEFAULT_DENIED = ("169.254.0.0/16", "fe80::/10", "127.0.0.0/8", "::1/128")
ENV_DENY = "MODELCACHE_DENY_SOURCE_CIDRS"  # comma-separated, added to the defaults
ENV_ALLOW_PRIVATE = "MODELCACHE_ALLOW_PRIVATE_SOURCES"  # "1"/"true": no deny list

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceAddressDenied(base.SourceError):
    """The source's host, or the address a connection was about to reach, is in a network
    the admin denied: terminal, no connection made."""

    reason = REASON
    retryable = False


class Policy:
    def __init__(self, denied: Iterable[str] = DEFAULT_DENIED) -> None:
        self.denied: tuple[Network, ...] = tuple(
            ipaddress.ip_network(c.strip(), strict=False) for c in denied if c.strip())

    def denies(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.denied)

    def check_url(self, url: str) -> None:
        """Raise ``SourceAddressDenied`` when ``url``'s host resolves into a denied network."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        if not host:
            raise SourceAddressDenied("source URL has no host", reason=REASON)
        shown = f"{parts.scheme}://{host}"
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, ValueError) as e:
            raise base.SourceUnavailable(f"{shown}: cannot resolve the source host "
                                         f"({type(e).__name__})") from None
        for info in infos:
            if self.denies(str(info[4][0])):
                raise SourceAddressDenied(
                    f"{shown}: the source address is in a network denied to sources",
                    reason=REASON)


_current: Policy | None = None
_whole_process = False  # guard every connect (the publish Job) or only in guarded()
_trusted: tuple[tuple[str, int], ...] = ()  # (host, port) the process itself must reach
_guarding: contextvars.ContextVar[bool] = contextvars.ContextVar("netpolicy_guarding",
                                                                  default=False)
_hook_lock = threading.Lock()
_hooked = False


def install(policy: Policy | None, *, whole_process: bool = True,
            trusted: Iterable[str] = ()) -> None:
    """Set the process's policy; None: deny nothing.

    ``whole_process``: the connect guard checks every connection of the
    process (the publish Job), else only those inside ``guarded()`` (the
    manager). ``trusted``: URLs or HOST:PORT the process must reach even when
    their address is denied (the Job's registry and report endpoint).
    """
    global _current, _whole_process, _trusted, _hooked
    _trusted = tuple(_endpoint(t) for t in trusted if t)
    _whole_process = whole_process
    _current = policy
    with _hook_lock:
        if policy is not None and not _hooked:
            sys.addaudithook(_audit)  # for the life of the process: hooks cannot be removed
            _hooked = True


def current() -> Policy | None:
    return _current


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Guard the connections this thread (context) opens in the block."""
    token = _guarding.set(True)
    try:
        yield
    finally:
        _guarding.reset(token)


def denial(e: BaseException | None) -> SourceAddressDenied | None:
    """The guard's refusal behind ``e``, if a library wrapped it (``__cause__`` or
    ``__context__``: botocore raises its own error inside the ``except``)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SourceAddressDenied):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _endpoint(text: str) -> tuple[str, int]:
    """``https://host:port/path`` or ``host:port`` → (host, port)."""
    parts = urllib.parse.urlsplit(text if "://" in text else f"//{text}")
    host = parts.hostname or ""
    port = parts.port or (80 if parts.scheme == "http" else 443)
    return host, port


def _addresses(host: str, port: int) -> set[str]:
    try:
        return {str(i[4][0]).split("%", 1)[0]
                for i in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


def _is_trusted(ip: str, port: int) -> bool:
    return any(p == port and ip in _addresses(h, p) for h, p in _trusted)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """The connect guard: ``socket.connect`` (and ``connect_ex``) with the address itself."""
    if event != "socket.connect":
        return
    policy = _current
    if policy is None or not (_whole_process or _guarding.get()):
        return
    sock, address = args
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets and the like: no network address
    host, port = str(address[0]), int(address[1])
    try:
        ips = {str(ipaddress.ip_address(host.split("%", 1)[0]))}
    except ValueError:  # a name: connect resolves it again, so check every answer
        ips = _addresses(host, port) or {host}
    for ip in ips:
        try:
            denied = policy.denies(ip)
        except ValueError:
            denied = True  # no address we can read: refuse rather than guess
        if denied and not _is_trusted(ip, port):
            raise SourceAddressDenied(
                "a connection to a network denied to sources was refused (a redirect, or "
                "a DNS answer that changed after the URL check)", reason=REASON)


def check(url: str) -> None:
    """Check ``url`` against the installed policy, if any."""
    if _current is not None:
        _current.check_url(url)


def from_settings(deny: Iterable[str], allow_private: bool, env: dict[str, str]) -> Policy | None:
    """The publish Job's policy: the defaults plus ``deny`` and $MODELCACHE_DENY_SOURCE_CIDRS,
    or none with ``allow_private`` / $MODELCACHE_ALLOW_PRIVATE_SOURCES."""
    if allow_private or env.get(ENV_ALLOW_PRIVATE, "").strip().lower() in ("1", "true", "yes"):
        return None
    extra = [c for c in env.get(ENV_DENY, "").split(",") if c.strip()]
    return Policy((*DEFAULT_DENIED, *deny, *extra))
