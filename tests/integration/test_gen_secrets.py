"""``modelcache-controller gen-secrets``: the plain manifests' Secrets, with no htpasswd tool.

Against a real kube-apiserver (tests/kubeenv.py) with the real kubectl: the
output applies with ``kubectl apply -f -``, and then every ``secretName``
(and every key its ``items`` name) of every manifest under ``daemonset/``
exists, except the two the controller makes itself. The htpasswd line is
checked by a real docker-registry: the clear password of ``dmcr-credentials``
pushes to a registry whose htpasswd file is the Secret's. ``--keep-existing``
re-runs without rotating anything.
"""

from __future__ import annotations

import base64
import glob
import os
import subprocess
import sys
import uuid
from typing import Any

import bcrypt
import pytest
import yaml

from cli.local import registry as localregistry
from controller import gensecrets
from modelpack.oci.registry import RegistryClient, RegistryError
from tests import kubeenv

kube = kubeenv.kube


def _mounted_secrets() -> dict[str, set[str]]:
    """secretName → keys its ``items`` name, over every manifest in daemonset/."""
    out: dict[str, set[str]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretName" in node:
                keys = out.setdefault(node["secretName"], set())
                keys |= {i["key"] for i in node.get("items") or []}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for path in glob.glob(os.path.join(kubeenv.REPO_ROOT, "daemonset", "*.yaml")):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                walk(doc)
    return out


def _gen(*args: str, kubeconfig: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": kubeenv.REPO_ROOT}
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    return subprocess.run([sys.executable, "-m", "controller.main", "gen-secrets", *args],
                          capture_output=True, text=True, timeout=60, env=env,
                          cwd=kubeenv.REPO_ROOT)


def _data(k: kubeenv.KubeEnv, ns: str, name: str) -> dict[str, str]:
    obj = yaml.safe_load(k.kubectl("get", "secret", "-n", ns, name, "-o", "yaml").stdout)
    return {key: base64.b64decode(v).decode() for key, v in obj["data"].items()}


def test_generated_secrets_cover_the_manifests(kube: kubeenv.KubeEnv,
                                               tmp_path: os.PathLike[str],
                                               small_model: str) -> None:
    ns = f"mc-gen-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", ns)
    res = _gen("--namespace", ns, "--keep-existing", kubeconfig=kube.kubeconfig)
    assert res.returncode == 0, res.stderr
    applied = kube.kubectl("apply", "-f", "-", input=res.stdout).stdout
    assert applied.count("created") == len(gensecrets.GENERATED), applied

    mounted = _mounted_secrets()
    assert set(mounted) == set(gensecrets.GENERATED) | gensecrets.CONTROLLER_MADE
    for name, keys in mounted.items():
        if name in gensecrets.CONTROLLER_MADE:
            continue
        assert keys <= set(_data(kube, ns, name)), name
    # what the manifests read through env or whole-Secret volumes
    assert set(_data(kube, ns, "dmcr-credentials")) == {"username", "password"}
    assert set(_data(kube, ns, "dmcr-pull-credentials")) == {"username", "password"}
    assert set(_data(kube, ns, "modelcache-report-key")) == {"key"}

    # the htpasswd line, as the DMCR reads it, takes the clear pair and nothing else
    creds = _data(kube, ns, "dmcr-credentials")
    htpasswd = os.path.join(str(tmp_path), "htpasswd")
    with open(htpasswd, "w") as f:
        f.write(_data(kube, ns, "dmcr-htpasswd")["htpasswd"])
    with localregistry.running(auth={"htpasswd": {"realm": "dmcr", "path": htpasswd}}) as reg:
        good = RegistryClient(reg.host, insecure=True, username=creds["username"],
                              password=creds["password"])
        digest = good.upload_bytes("models/check", b"gen-secrets")
        assert good.blob_exists("models/check", digest)
        bad = RegistryClient(reg.host, insecure=True, username=creds["username"],
                             password=creds["password"] + "x", retries=0)
        with pytest.raises(RegistryError):
            bad.upload_bytes("models/check", b"other")

    # a re-run keeps every Secret: nothing printed, nothing rotated
    again = _gen("--namespace", ns, "--keep-existing", kubeconfig=kube.kubeconfig)
    assert again.returncode == 0 and again.stdout == "", again.stderr
    assert again.stderr.count("# kept: Secret") == len(gensecrets.GENERATED)
    assert _data(kube, ns, "dmcr-credentials") == creds

    # a lost htpasswd is made again from the kept push password, so the pair still matches
    kube.kubectl("delete", "secret", "-n", ns, "dmcr-htpasswd")
    third = _gen("--namespace", ns, "--keep-existing", kubeconfig=kube.kubeconfig)
    docs = [d for d in yaml.safe_load_all(third.stdout) if d]
    assert [d["metadata"]["name"] for d in docs] == ["dmcr-htpasswd"]
    line = base64.b64decode(docs[0]["data"]["htpasswd"]).decode().strip()
    user, hashed = line.split(":", 1)
    assert user == "modelcache" and bcrypt.checkpw(creds["password"].encode(), hashed.encode())


def test_htpasswd_without_its_password_is_refused() -> None:
    with pytest.raises(gensecrets.GenError, match="dmcr-credentials does not"):
        gensecrets.manifests("x", {"dmcr-htpasswd": {"htpasswd": "modelcache:$2b$…"}})


def test_without_keep_existing_every_secret_is_new() -> None:
    a, b = gensecrets.manifests("ns"), gensecrets.manifests("ns")
    assert [d["metadata"]["name"] for d in a] == list(gensecrets.GENERATED)
    assert all(d["metadata"]["namespace"] == "ns" for d in a)
    assert a[1]["data"]["password"] != b[1]["data"]["password"]
