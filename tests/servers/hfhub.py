"""The Hugging Face Hub-compatible test server: ``cli/local/hub.py`` (the demo
serves its model from the same server), re-exported under the names the
source tests, ``tests/servers/fixtures.py`` and the benchmarks use."""

from cli.local.hub import LFS_SUFFIXES, HubFile, HubServer, Knobs, Repo

__all__ = ["LFS_SUFFIXES", "HubFile", "HubServer", "Knobs", "Repo"]
