"""The SharedPVC materializer as its Job runs it: not root, no capabilities (issue #15).

The Job runs ``modelcache-controller materialize`` as the image's user
(``jobspec.WORKER_GID``, Dockerfile.controller's ``USER``) with every
capability dropped, on a volume that user owns. Without CAP_DAC_OVERRIDE,
moving the finished 0555 tree from its staging dir to its final path fails
(a directory moved to another parent has its ``..`` rewritten, which needs
write permission on the directory itself): the materializer must open the
tree for the rename and close it again. Run as root, the bug does not show,
so the CLI runs here in a child process switched to that uid and gid (dropping
root's capabilities with it): a fork calling the CLI's entry point, since this
interpreter lives under root's 0700 home. A test session that is not root
runs it as itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterator

import pytest

from api import names as contract
from controller import jobspec
from controller import main as controller_main
from jobs import materialize
from modelpack.oci.reference import parse
from modelpack.pack import pack_to_registry
from tests.servers.helpers import same_tree

UID = GID = jobspec.WORKER_GID  # the worker image's user and group


def run_as_worker(argv: list[str]) -> int:
    """``modelcache-controller ARGV`` (``controller.main.main``, the Job's entry point) in a
    forked child that is the worker's uid and gid, with no supplementary groups; its exit
    status. A fork, not an exec: this interpreter lives under root's 0700 home."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(GID)
                os.setuid(UID)  # from root to a user: the capabilities go with it
            code = controller_main.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def volume() -> Iterator[str]:
    """A directory the worker owns, reachable by it (pytest's tmp dirs are root's 0700)."""
    root = tempfile.mkdtemp(prefix="mc-nonroot-")
    os.chmod(root, 0o755)
    pvc = os.path.join(root, "pvc")
    os.mkdir(pvc)
    if os.geteuid() == 0:
        os.chown(pvc, UID, GID)
    yield pvc
    for dirpath, dirs, _ in os.walk(root):  # the tree is 0555: open it to remove it
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o755)
    shutil.rmtree(root)


def test_non_root_materializer_lands_the_tree_read_only(registry, client, small_model,
                                                        volume):
    res = pack_to_registry(small_model, client, parse(f"{registry.host}/mat/nonroot:v1"))
    digest = res.pack.digest
    root = os.geteuid() == 0
    out = os.path.join(os.path.dirname(volume), "result.json")
    open(out, "w").close()
    if root:
        os.chown(out, UID, GID)
    code = run_as_worker(["materialize", "--reference", f"{registry.host}/mat/nonroot:v1",
                          "--dest", volume, "--digest", digest, "--insecure",
                          "--result-file", out])
    with open(out) as f:
        text = f.read()
    try:
        result = json.loads(text)
    except ValueError as e:
        raise AssertionError(f"no result JSON (exit {code}): {text!r}") from e
    assert code == 0, result
    tree = os.path.join(volume, contract.pvc_subpath(digest))
    assert result["digest"] == digest and result["path"] == tree and not result["skipped"]
    same_tree(small_model, tree)  # complete: every file, byte for byte
    for dirpath, _, names in os.walk(tree):
        st = os.stat(dirpath)
        assert st.st_mode & 0o777 == 0o555, (dirpath, oct(st.st_mode))
        if root:
            assert st.st_uid == UID, dirpath  # written by the worker, not by this test
        for n in names:
            mode = os.stat(os.path.join(dirpath, n)).st_mode
            assert mode & 0o222 == 0 and mode & 0o444 == 0o444, (n, oct(mode))
    assert not [n for n in os.listdir(volume)
                if n.startswith((materialize.STAGING_PREFIX, materialize.BROKEN_PREFIX))]
