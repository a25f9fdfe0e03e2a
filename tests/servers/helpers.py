"""Helpers for the source and publish tests: pull back, compare trees."""

from __future__ import annotations

import os

from modelpack.oci import reference
from modelpack.oci.manifest import ModelPack
from modelpack.oci.registry import RegistryClient
from modelpack.pull import pull_to_dir


def pull_back(client: RegistryClient, ref: str, dest: str) -> ModelPack:
    return pull_to_dir(client, reference.parse(ref), dest)


def same_tree(a: str, b: str) -> None:
    """Assert two directories hold the same files with the same bytes."""
    def listing(root: str) -> dict[str, bytes]:
        out = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                full = os.path.join(dirpath, n)
                with open(full, "rb") as f:
                    out[os.path.relpath(full, root)] = f.read()
        return out

    la, lb = listing(a), listing(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        assert la[k] == lb[k], k


def tags(client: RegistryClient, repository: str) -> list[str]:
    return client.list_tags(repository)
