"""A publish caught mid-taint is retried, not failed for good.

Scrub may taint (move away) a tree between the publish's lease and its bind
mount. kubelet treats every code but ABORTED, UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and CANCELLED as final and removes the
target, so the bind's ENOENT must come back as ABORTED, with the target
directory it made removed. Needs root (a real bind mount is attempted).
"""

from __future__ import annotations

import os

import grpc
import pytest

from csi.cache import Cache, Tree
from csi.errors import CsiError
from csi.node import NodeService
from csi.resolvers.base import NoResolver

pytestmark = pytest.mark.root


def test_tree_withdrawn_before_the_bind_is_aborted(tmp_path):
    cache = Cache(str(tmp_path / "cache"), client_for=lambda host: None)
    node = NodeService("node-1", cache, NoResolver())
    gone = Tree(digest="sha256:" + "a" * 64, path=str(tmp_path / "cache" / "models" / "gone"),
                size=0, files=0)
    target = str(tmp_path / "pod" / "mount")
    os.makedirs(os.path.dirname(target))
    with pytest.raises(CsiError) as e:
        node._mount(gone, target)
    assert e.value.code == grpc.StatusCode.ABORTED, e.value
    assert not os.path.exists(target)
    cache.close()


def test_other_mount_failures_stay_what_they_were(tmp_path):
    cache = Cache(str(tmp_path / "cache"), client_for=lambda host: None)
    node = NodeService("node-1", cache, NoResolver())
    here = tmp_path / "tree"
    here.mkdir()
    tree = Tree(digest="sha256:" + "b" * 64, path=str(here), size=0, files=0)
    with pytest.raises(CsiError) as e:  # the target's parent does not exist
        node._mount(tree, str(tmp_path / "missing" / "mount"))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    cache.close()
