"""The Hugging Face Hub-compatible test server: ``cli/local/hub.py`` (the demo
serves its model from the same server), re-exported under the names the
source tests, ``tests/servers/fixtures.py`` and the benchmarks use."""

from cli.local.hub import LFS_SUFFIXES, HubFile, HubServer, Knobs, Repo

__all__ = ["LFS_SUFFIXES", "HubFile", "HubServer", "Knobs", "Repo", "RoutedHub"]


class RoutedHub(HubServer):
    """The hub whose CDN redirects go through a proxy on loopback (``cdn_via``, host:port):
    the benchmark's per-connection throttle, a test's tampering proxy. ``cdn_host`` is
    where the CDN itself listens, for the proxy's upstream."""

    cdn_via: str | None = None

    @property
    def cdn_host(self) -> str:
        return super().cdn_url.split("://", 1)[1]

    @property
    def cdn_url(self) -> str:
        return f"http://{self.cdn_via}" if self.cdn_via else super().cdn_url
