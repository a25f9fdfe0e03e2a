"""Which network addresses a source may reach: the admin's deny list.

A source URL is chosen by whoever writes a Model, and the publish Job runs
inside the cluster: without a check, ``http://169.254.169.254/...`` (cloud
metadata), loopback or the service network (the API server) would be
fetched by the controller's own Job. The publish Job installs a ``Policy``
(``jobs/publish.py``: on by default, ``--deny-source-cidr`` adds networks,
``--allow-private-sources`` turns it off for development and tests); the
HTTP sources check every request, each redirect hop included
(``httpio.TimeoutSession.send``), and the S3 / Hugging Face endpoints when
the source is made, before any connection. Without an installed policy
(the ``modelcache pack`` CLI on a user's own machine, library use) nothing
is denied.

The host is resolved here and refused if *any* of its addresses is in a
denied network. Stated limit: the connection resolves the name again, so a
name whose answer changes between the two lookups (DNS rebinding) is not
caught by this check alone; the chart's egress policy is the second line.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Iterable

from ingest.sources import base

REASON = "SourceAddressDenied"
DEFAULT_DENIED = ("169.254.0.0/16", "fe80::/10", "127.0.0.0/8", "::1/128")
ENV_DENY = "MODELCACHE_DENY_SOURCE_CIDRS"  # comma-separated, added to the defaults
ENV_ALLOW_PRIVATE = "MODELCACHE_ALLOW_PRIVATE_SOURCES"  # "1"/"true": no deny list

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceAddressDenied(base.SourceError):
    """The source's host is in a network the admin denied: terminal, no connection made."""

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


def install(policy: Policy | None) -> None:
    """Set the process's policy (the publish Job does, at start); None: deny nothing."""
    global _current
    _current = policy


def current() -> Policy | None:
    return _current


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
