"""CSI conformance: csi-sanity (kubernetes-csi/csi-test) against the real plugin.

csi-sanity is built by hack/install.d/csi-sanity.sh into
~/.cache/modelcache-tools/csi-sanity-<tag>/ (or given as $CSI_SANITY). The
plugin runs as ``modelcache-node`` would on a node, with a --models-file.
Only specs that need a Controller service are skipped (this driver is
node-only); every other spec must pass.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

from tests import csi_fixtures as cf_

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

TAG_FILE = os.path.join(cf_.REPO_ROOT, "hack", "install.d", "csi-sanity.sh")
# Controller-service specs: CreateVolume & co., snapshots, controller expansion/modify,
# and the two Node specs whose setup calls CreateVolume on a Controller service
# ("should remove target path", "...volume does not exist on the specified path");
# test_csi_node.py covers the same behaviour with real models.
SKIP = (r"Controller Service|\[Controller Server\]|CreateSnapshot|DeleteSnapshot|ListSnapshots|"
        r"ModifyVolume|GroupController|SnapshotMetadata|"
        r"should remove target path|should fail when volume does not exist on the specified path")


def csi_sanity_binary() -> str:
    env = os.environ.get("CSI_SANITY")
    if env:
        return env
    with open(TAG_FILE) as f:
        tag = re.search(r"CSI_SANITY_TAG:-(v[0-9.]+)", f.read()).group(1)
    path = os.path.expanduser(f"~/.cache/modelcache-tools/csi-sanity-{tag}/csi-sanity")
    if not os.path.exists(path):
        found = sorted(glob.glob(os.path.expanduser(
            "~/.cache/modelcache-tools/csi-sanity-*/csi-sanity")))
        pytest.fail(f"csi-sanity {tag} not built (run hack/install.sh); found {found}")
    return path


def test_csi_sanity_passes(tmp_path, registry):
    work = str(tmp_path)
    models = os.path.join(work, "models.yaml")
    with open(models, "w") as f:
        f.write(f"models:\n  default/m: {registry.host}/models/none:v1\nclusterModels: {{}}\n")
    plugin = cf_.PluginProcess(work, os.path.join(work, "cache"), models, [registry.host])
    plugin.start()
    try:
        res = subprocess.run(
            [csi_sanity_binary(), f"--csi.endpoint={plugin.socket}",
             f"--csi.mountdir={work}/mnt", f"--csi.stagingdir={work}/stage",
             f"--ginkgo.skip={SKIP}", "--ginkgo.no-color", "--ginkgo.timeout=4m"],
            capture_output=True, text=True, timeout=280, check=False)
    finally:
        plugin.stop()
        shutil.rmtree(os.path.join(work, "mnt"), ignore_errors=True)
    out = res.stdout + res.stderr
    summary = re.search(r"Ran (\d+) of (\d+) Specs.*\n.*?(\d+) Passed \| (\d+) Failed", out)
    assert summary, out[-3000:]
    ran, _, passed, failed = (int(x) for x in summary.groups())
    assert failed == 0 and res.returncode == 0, out[-6000:] + "\n" + plugin.log_tail()
    assert passed == ran and ran >= 13, summary.group(0)
