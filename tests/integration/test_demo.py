"""The embedded demo (``modelcache demo``, README's first command), end to end.

Everything is real: etcd + kube-apiserver, docker-registry, the local hub
serving the real all-MiniLM-L6-v2 directory, the controller manager (its
publish Job run by the embedded Job runner), the node plugin and a real
read-only bind mount. Acceptance: the output shows Ready, the digest (the
registry's own manifest digest), the mounted files (byte-identical to the
model directory), the env contract; teardown leaves no process, mount or
directory behind; a failure names the component and why. Needs root (the
bind mount).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from api import names as contract
from cli import demo as demo_mod
from cli.local import cluster as localcluster
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from tests.servers.helpers import same_tree

pytestmark = pytest.mark.root

DIGEST_RE = re.compile(r"^    digest +(sha256:[0-9a-f]{64})$", re.M)


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. the demo's work dir)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(cmd)
    return out


def _mounted_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if os.path.realpath(path) + "/" in line]


def _assert_gone(work: str, procs: list[subprocess.Popen[bytes]]) -> None:
    assert all(p.poll() is not None for p in procs)
    assert _processes_mentioning(work) == []
    assert _mounted_under(work) == []
    assert not os.path.exists(work)


def test_demo_up_shows_ready_digest_files_env(tmp_path: os.PathLike[str], minilm_dir: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    work = os.path.join(str(tmp_path), "demo")
    d = demo_mod.Demo(work, progress=False)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        d.up()
        out = capsys.readouterr().out
        procs = d.processes
        assert len(procs) == 5  # etcd, kube-apiserver, registry, manager, node plugin

        # Ready, with the metadata the controller verified
        assert "    phase Ready (" in out
        status = d.model["status"]
        assert status["phase"] == "Ready"
        assert status["resolved"]["format"] == "Safetensors"
        assert status["resolved"]["family"] == "bert"
        assert "parameterCount  22,713,728" in out

        # the digest printed is the Model's, and the registry serves that manifest
        printed = DIGEST_RE.findall(out)
        assert printed == [status["artifact"]["digest"]]
        ref = reference.parse(status["artifact"]["reference"])
        assert d.registry is not None
        _, registry_digest, _ = RegistryClient(d.registry.host, insecure=True).get_manifest(
            reference.Reference(ref.host, ref.repository, ref.tag))
        assert registry_digest == printed[0]

        # the mounted tree: every file of the model, byte-identical, listed, read-only
        same_tree(d.target, minilm_dir)
        for rel in ("model.safetensors", "config.json", "tokenizer.json", "1_Pooling/config.json"):
            size = os.path.getsize(os.path.join(minilm_dir, rel))
            assert re.search(rf"^ +{size:,}  {re.escape(rel)}$", out, re.M), rel
        with pytest.raises(OSError) as err:
            open(os.path.join(d.target, "new-file"), "w")
        assert err.value.errno == 30  # EROFS
        assert "write refused: [Errno 30] Read-only file system" in out

        # the env contract, as the webhook injects it
        assert f"      {contract.ENV_DIR}={contract.MOUNT_ROOT}\n" in out
        models = json.loads(re.search(rf"^      {contract.ENV_MODELS}=(.*)$", out, re.M)
                            .group(1))  # type: ignore[union-attr]
        assert models == [{"name": "all-minilm-l6-v2",
                           "path": f"{contract.MOUNT_ROOT}/all-minilm-l6-v2",
                           "digest": printed[0], "family": "bert", "format": "Safetensors"}]
        assert "demo: OK" in out
    finally:
        d.down()
    _assert_gone(work, procs)


def test_demo_failure_names_the_component(tmp_path: os.PathLike[str]) -> None:
    model_file = os.path.join(str(tmp_path), "model.yaml")
    with open(model_file, "w") as f:
        f.write("apiVersion: modelcache.io/v1alpha1\nkind: Model\nmetadata: {name: nope}\n"
                "spec: {source: {huggingFace: {repo: nobody/no-such-model}}}\n")
    work = os.path.join(str(tmp_path), "demo")
    d = demo_mod.Demo(work, model_file=model_file, progress=False)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with pytest.raises(demo_mod.DemoError) as err:
            d.up()
        procs = d.processes
        assert err.value.component == "controller"
        assert "Model nope Failed" in str(err.value)
        assert "RepoNotFound" in str(err.value) or "not found" in str(err.value).lower()
    finally:
        d.down()
    _assert_gone(work, procs)


def test_demo_command_once() -> None:
    """README's first command, minus the install: ``modelcache demo --once``."""
    res = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--once"],
                         cwd=localcluster.REPO_ROOT, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    for n in range(1, 12):
        assert f"\n[{n}] " in out
    assert "    phase Ready (" in out
    assert DIGEST_RE.search(out)
    assert re.search(r"^ +90,868,376  model\.safetensors$", out, re.M)
    assert f"{contract.ENV_MODELS}=[{{" in out
    assert out.rstrip().endswith("demo: stopped; nothing left running or mounted")
    work = re.search(r"kubeconfig (/\S+)/kube/kubeconfig", out).group(1)  # type: ignore[union-attr]
    _assert_gone(work, [])
