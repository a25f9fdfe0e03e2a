"""The Dockerfiles, parsed with the official BuildKit parser and held to a
few rules. hack/images.sh builds them (tests/e2e/test_product_images.py)."""

from __future__ import annotations

import glob
import os

import dockerfile
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "Dockerfile.*")))


def test_both_dockerfiles_exist():
    names = {os.path.basename(f) for f in FILES}
    assert {"Dockerfile.controller", "Dockerfile.node"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_dockerfile_rules(path):
    cmds = dockerfile.parse_file(path)
    # ARGs before the first FROM: a base given as ${BASE} is checked at its default
    args = dict(c.value[0].partition("=")[::2] for c in cmds if c.cmd == "ARG")
    froms = [c.value[0] for c in cmds if c.cmd == "FROM"]
    assert froms, "no FROM"
    froms = [args.get(f[2:-1], f) if f.startswith("${") else f for f in froms]
    for image in froms:
        if image in {c.value[-1] for c in cmds if c.cmd == "FROM" and len(c.value) == 3}:
            continue  # a named stage
        assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    for c in cmds:
        assert c.cmd != "ADD" or not c.value[0].startswith("http"), "ADD of a URL"
        assert c.cmd != "MAINTAINER"
    assert any(c.cmd in ("ENTRYPOINT", "CMD") for c in cmds)
    if path.endswith("controller"):
        users = [c.value[0] for c in cmds if c.cmd == "USER"]
        assert users and not users[-1].startswith(("0", "root")), "controller must not run as root"
    # hermetic: installs come from the wheelhouse hack/images.sh puts in the context
    for c in cmds:
        if c.cmd == "RUN" and " install " in c.value[0]:
            assert "--no-index" in c.value[0] and "apt-get" not in c.value[0], c.value[0]
