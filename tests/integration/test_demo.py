"""The embedded demo (``modelcache demo``, README's first command), end to end.

Everything is real: etcd + kube-apiserver, docker-registry, the local hub
serving the real all-MiniLM-L6-v2 directory, the upload gateway, the
controller manager (its Jobs run by the embedded Job runner, its admission
webhook registered with the API server), the node plugin and a real
read-only bind mount. Acceptance: the output shows Ready, the digest (the
registry's own manifest digest), the mounted files (byte-identical to the
model directory), the env contract, where the Jobs' logs are; a Deployment
applied with kubectl (the demo's kubeconfig) is stored mutated; an upload
Model and a PVC Model reach Ready through the gateway; teardown leaves no
process, mount or directory behind; a failure names the component and why.
Needs root (the bind mount).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from api import names as contract
from cli import demo as demo_mod
from cli.local import cluster as localcluster
from kube import client as kube
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
                                              small_model: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    work = os.path.join(str(tmp_path), "demo")
    d = demo_mod.Demo(work, progress=False)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        d.up()
        out = capsys.readouterr().out
        procs = d.processes
        assert len(procs) == 6  # etcd, kube-apiserver, registry, gateway, manager, node plugin

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

        _assert_jobs_logged(d, out)
        _assert_webhook_mutates(d, out)
        _assert_upload_ready(d, small_model, str(tmp_path))
        _assert_pvc_ready(d, small_model)
    finally:
        d.down()
    _assert_gone(work, procs)


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s")


def _kubectl(out: str, *args: str, input: str | None = None) -> str:
    """kubectl as a user runs it: with the kubeconfig the demo printed."""
    kubeconfig = re.search(r"^    kubeconfig (/\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    res = subprocess.run([localcluster.binaries().kubectl, *args], input=input, text=True,
                         capture_output=True, timeout=60,
                         env={**os.environ, "KUBECONFIG": kubeconfig})
    assert res.returncode == 0, res.stderr
    return res.stdout


def _assert_jobs_logged(d: demo_mod.Demo, out: str) -> None:
    """The summary names the Job log directory, and the publish Job's log is in it."""
    logs = re.search(r"^\[14\] Job logs .*: (/\S+)$", out, re.M)
    assert logs is not None and logs.group(1) == d.jobs_dir
    listed = re.findall(rf"^    job/(mc-\S+) \(modelcache-system\): ({re.escape(d.jobs_dir)}/\S+)$",
                        out, re.M)
    assert listed, out[-2000:]
    for _, path in listed:
        assert os.path.isfile(path)
    # the publish worker's progress lines, to the last one
    assert any('"phase": "done"' in open(p, errors="replace").read() for _, p in listed)


def _assert_webhook_mutates(d: demo_mod.Demo, out: str) -> None:
    """The webhook is registered with the demo's API server by URL, with the manager's CA;
    an annotated Deployment applied with kubectl comes back injected and gated."""
    mwc = json.loads(_kubectl(out, "get", "mutatingwebhookconfiguration", "modelcache",
                              "-o", "json"))
    for hook in mwc["webhooks"]:
        assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:")
        assert hook["clientConfig"]["caBundle"]
        assert hook["failurePolicy"] == "Fail"
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": "user-app",
                           "annotations": {contract.ANN_MODELS: "all-minilm-l6-v2"}},
              "spec": {"selector": {"matchLabels": {"app": "u"}},
                       "template": {"metadata": {"labels": {"app": "u"}},
                                    "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
    _kubectl(out, "apply", "-f", "-", input=json.dumps(deploy))
    spec = json.loads(_kubectl(out, "get", "deployment", "user-app", "-o", "json")
                      )["spec"]["template"]["spec"]
    vol = [v for v in spec["volumes"] if v.get("csi")][0]
    assert vol["csi"]["driver"] == contract.CSI_DRIVER
    assert vol["csi"]["volumeAttributes"]["digest"] == d.model["status"]["artifact"]["digest"]
    c = spec["containers"][0]
    assert {"name": vol["name"], "mountPath": f"{contract.MOUNT_ROOT}/all-minilm-l6-v2",
            "readOnly": True}.items() <= next(m for m in c["volumeMounts"]
                                              if m["name"] == vol["name"]).items()
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env[contract.ENV_DIR] == contract.MOUNT_ROOT
    assert json.loads(env[contract.ENV_MODELS])[0]["name"] == "all-minilm-l6-v2"
    assert {"name": contract.GATE} in spec["schedulingGates"]
    # the Pod the demo created is stored injected, its gate lifted by the manager
    pod = d.client.get(kube.PODS, demo_mod.POD, d.namespace)
    assert "schedulingGates" not in pod["spec"] or not pod["spec"]["schedulingGates"]
    assert any((v.get("csi") or {}).get("driver") == contract.CSI_DRIVER
               for v in pod["spec"]["volumes"])


def _model(d: demo_mod.Demo, name: str) -> dict[str, Any]:
    return d.client.get(kube.MODELS, name, d.namespace)  # type: ignore[no-any-return]


def _ready(d: demo_mod.Demo, name: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        m = _model(d, name)
        phase = (m.get("status") or {}).get("phase")
        assert phase != "Failed", m["status"]
        return m if phase == "Ready" else None
    return _wait_for(f"Model {name} Ready", done, 60)  # type: ignore[no-any-return]


def _assert_upload_ready(d: demo_mod.Demo, src: str, tmp: str) -> None:
    """source.upload: the gateway opens a session; ``modelcache upload --url --token-file``."""
    d.client.create(kube.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                                  "metadata": {"name": "uploaded"},
                                  "spec": {"source": {"upload": {}}}}, d.namespace)
    m = _wait_for("status.upload", lambda: (_model(d, "uploaded").get("status") or {}
                                            ).get("upload"))
    assert m["url"].startswith(d.gateway_url + "/")
    secret = d.client.get(kube.SECRETS, m["tokenSecretRef"]["name"], d.namespace)
    token_file = os.path.join(tmp, "upload-token")
    with open(token_file, "w") as f:
        f.write(base64.b64decode(secret["data"]["token"]).decode())
    res = subprocess.run([sys.executable, "-m", "cli.main", "upload", "uploaded", src,
                          "--url", m["url"], "--token-file", token_file, "--no-progress"],
                         cwd=localcluster.REPO_ROOT, capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    st = _ready(d, "uploaded")["status"]
    assert st["artifact"]["reference"].startswith(f"{d.registry.host}/models/"  # type: ignore[union-attr]
                                                  f"{d.namespace}/uploaded:")
    assert st["artifact"]["digest"] in res.stdout


def _assert_pvc_ready(d: demo_mod.Demo, src: str) -> None:
    """source.pvc: the claim is the demo's directory; the reader Job runs as a process."""
    shutil.copytree(src, os.path.join(d.claim_dir("weights"), "m"))
    d.client.create(kube.PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                "metadata": {"name": "weights"},
                                "spec": {"accessModes": ["ReadWriteOnce"],
                                         "resources": {"requests": {"storage": "1Gi"}}}},
                    d.namespace)
    d.client.create(kube.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                                  "metadata": {"name": "from-pvc"},
                                  "spec": {"source": {"pvc": {"claimName": "weights",
                                                              "path": "m/"}}}}, d.namespace)
    st = _ready(d, "from-pvc")["status"]
    assert st["resolved"]["format"] == "Safetensors"


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
    for n in range(1, 15):
        assert f"\n[{n}] " in out
    assert "    phase Ready (" in out
    assert DIGEST_RE.search(out)
    assert re.search(r"^ +90,868,376  model\.safetensors$", out, re.M)
    assert f"{contract.ENV_MODELS}=[{{" in out
    assert out.rstrip().endswith("demo: stopped; nothing left running or mounted")
    work = re.search(r"kubeconfig (/\S+)/kube/kubeconfig", out).group(1)  # type: ignore[union-attr]
    _assert_gone(work, [])
