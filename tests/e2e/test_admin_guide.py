"""docs/admin-guide.md, "Install on a real cluster", checked without a cluster.

The section's commands need a real cluster (the doc marks them
``cluster-only``; tests/e2e/test_as_deployed.py installs the same chart on
two real nodes). What can be checked here is that they are real: the values
file the section has the user save is rendered by ``helm template`` with the
exact arguments of its ``helm install`` line; every key in it exists in the
chart's values.yaml (Helm ignores unknown keys, so a typo would install
silently without effect); the rendered objects use the images it names; and
the objects its ``kubectl`` lines wait for exist in that render.
Not marked e2e: it runs in the plain suite, with helm from hack/install.d/helm.sh.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from typing import Any

import yaml

from tests.integration.test_chart import KUBE_VERSION, helm  # noqa: F401  (fixture)
from tests.integration.test_docs_commands import parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = "docs/admin-guide.md"
SECTION = "### Install on a real cluster"


def section_blocks() -> list[Any]:
    with open(os.path.join(ROOT, DOC)) as f:
        lines = f.read().splitlines()
    start = lines.index(SECTION) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(("## ", "### ")))
    return [b for b in parse(DOC) if start < b.line <= end]


def leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += leaves(v, key + ".") if isinstance(v, dict) and v else [key]
    return out


def has_key(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_install_on_a_real_cluster_renders_as_written(helm: str, tmp_path: Any) -> None:  # noqa: F811
    blocks = section_blocks()
    (saved,) = [b for b in blocks if b.save_as]
    (shell,) = [b for b in blocks if b.lang == "bash"]
    assert shell.mark and shell.mark[0] == "cluster-only", shell.mark
    mine = yaml.safe_load("\n".join(saved.body))
    with open(os.path.join(ROOT, "charts", "modelcache", "values.yaml")) as f:
        defaults = yaml.safe_load(f)
    unknown = [k for k in leaves(mine) if not has_key(defaults, k)]
    assert not unknown, f"keys the chart does not have: {unknown}"
    with open(tmp_path / saved.save_as, "w") as f:
        f.write("\n".join(saved.body) + "\n")

    commands = [shlex.split(c.text.replace("\\\n", " ")) for c in shell.commands()]
    (install,) = [c for c in commands if c[:2] == ["helm", "install"]]
    # run from the repository root, as the user does; the saved file is in tmp_path
    argv = [helm, "template", *(str(tmp_path / a) if a == saved.save_as else a
                                for a in install[2:]), "--kube-version", KUBE_VERSION]
    got = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    objs = [o for o in yaml.safe_load_all(got.stdout) if o]
    ns = install[install.index("-n") + 1]
    images = {c["image"] for o in objs if o["kind"] in ("Deployment", "DaemonSet")
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert {mine["controller"]["image"], mine["node"]["image"], mine["dmcr"]["image"],
            mine["node"]["registrarImage"], mine["node"]["livenessProbeImage"]} <= images, images
    by = {(o["kind"].lower(), o["metadata"]["name"]): o for o in objs}
    assert by[("configmap", "modelcache-alert-rules")] and by[("configmap", "modelcache-dashboard")]
    node_args = by[("daemonset", "modelcache-node")]["spec"]["template"]["spec"]["containers"][0]
    assert f"--registry-mirror={mine['node']['registryMirrors'][0]}" in node_args["args"]
    for c in commands:
        if c[:1] == ["kubectl"] and "rollout" in c:
            kind, name = c[c.index("status") + 1].split("/")
            assert (kind, name) in by, (kind, name)
            assert c[c.index("-n") + 1] == ns == by[(kind, name)]["metadata"]["namespace"]
    assert re.search(r"nodecache\.modelcache\.io", " ".join(
        o["metadata"]["name"] for o in objs if o["kind"] == "CSIDriver"))
