"""The DMCR on S3: the chart's S3 storage, run by the real registry against versitygw.

The chart is rendered with ``dmcr.storage.type=s3``; the storage sections of
its ``config.yml`` (push) and ``config-pull.yml`` (read-only pull endpoint) are
given, as rendered, to two real docker-registry processes, with the access
keys reaching them the way the Deployment gives them: the rendered
``secretKeyRef`` env resolved against a Secret. A model is pushed through the
first, pulled back byte-identical through the second, and its blobs are found
in the bucket. helm comes from hack/install.d/helm.sh, versitygw from
hack/install.d/versitygw.sh.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from typing import Any

import pytest
import yaml

from cli.local import registry as localregistry
from modelpack.errors import RegistryError
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_dir
from tests import kubeenv, modelgen
from tests.integration import test_chart as chart
from tests.servers import s3 as s3server
from tests.servers.helpers import same_tree

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube

SECRET = {"name": "dmcr-s3", "data": {"accessKey": s3server.ACCESS_KEY,
                                      "secretKey": s3server.SECRET_KEY}}


@pytest.fixture(scope="module")
def helm() -> str:
    path = os.environ.get("HELM") or os.path.join(
        kubeenv.TOOLS, f"helm-{chart.HELM_VERSION}", "helm")
    if not os.access(path, os.X_OK):
        pytest.fail(f"helm not built: {path} (run hack/install.d/helm.sh)")
    return path


def _render_s3(helm: str, endpoint: str,
               namespace: str = "ai") -> dict[tuple[str, str], dict[str, Any]]:
    objs = chart.render(helm, namespace, "dmcr.storage.type=s3", "dmcr.storage.s3.bucket=dmcr",
                        f"dmcr.storage.s3.regionEndpoint={endpoint}",
                        "dmcr.storage.s3.secure=false", "dmcr.storage.s3.forcePathStyle=true",
                        "dmcr.storage.s3.rootDirectory=/cluster-a",
                        f"dmcr.storage.s3.credentialsSecret={SECRET['name']}")
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet would give it, from the test's Secret."""
    out = {}
    for e in container.get("env", []):
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET["name"]
        out[e["name"]] = SECRET["data"][ref["key"]]  # type: ignore[index]
    return out


def test_s3_values_render_no_volume_and_keys_from_the_secret(helm: str) -> None:
    by = _render_s3(helm, "http://minio.storage.svc:9000")
    assert ("PersistentVolumeClaim", "dmcr-data") not in by
    pod = by[("Deployment", "dmcr")]["spec"]["template"]["spec"]
    assert "data" not in {v["name"] for v in pod["volumes"]}
    for c in pod["containers"]:
        assert "data" not in {m["name"] for m in c["volumeMounts"]}
        assert set(_env(c)) == {"REGISTRY_STORAGE_S3_ACCESSKEY", "REGISTRY_STORAGE_S3_SECRETKEY"}
    data = by[("ConfigMap", "dmcr-config")]["data"]
    for name in ("config.yml", "config-pull.yml"):
        s3 = yaml.safe_load(data[name])["storage"]["s3"]
        assert s3 == {"bucket": "dmcr", "region": "us-east-1",
                      "regionendpoint": "http://minio.storage.svc:9000", "secure": False,
                      "forcepathstyle": True, "rootdirectory": "/cluster-a"}
        assert SECRET["data"]["secretKey"] not in data[name]  # type: ignore[index]
    # the defaults keep the filesystem PVC (the plain manifests' storage)
    default = {(o["kind"], o["metadata"]["name"]) for o in chart.render(helm, "ai")}
    assert ("PersistentVolumeClaim", "dmcr-data") in default


def test_s3_rendering_passes_server_dry_run(kube: kubeenv.KubeEnv, helm: str) -> None:
    ns = f"mc-dmcr-s3-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", ns)
    by = _render_s3(helm, "http://minio.storage.svc:9000", ns)
    objs = [by[("Deployment", "dmcr")], by[("ConfigMap", "dmcr-config")]]
    done = kube.kubectl("apply", "--dry-run=server", "-f", "-", check=False,
                        input=yaml.safe_dump_all(objs))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("created (server dry run)") == 2, done.stdout


def test_s3_without_a_bucket_or_with_an_unknown_type_fails_to_render(helm: str) -> None:
    for sets, words in ((["dmcr.storage.type=s3"], "dmcr.storage.s3.bucket is required"),
                        (["dmcr.storage.type=gcs"], "must be filesystem or s3")):
        args = [helm, "template", "mc", chart.CHART, "--kube-version", chart.KUBE_VERSION]
        for s in sets:
            args += ["--set", s]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and words in done.stderr, done.stderr


def test_dmcr_on_s3_pushes_pulls_and_keeps_blobs_in_the_bucket(
        helm: str, s3: s3server.S3Server, tmp_path: Any) -> None:
    s3.client().create_bucket(Bucket="dmcr")
    by = _render_s3(helm, s3.endpoint)
    data = by[("ConfigMap", "dmcr-config")]["data"]
    containers = {c["name"]: c for c in
                  by[("Deployment", "dmcr")]["spec"]["template"]["spec"]["containers"]}
    push_storage = yaml.safe_load(data["config.yml"])["storage"]
    pull_storage = yaml.safe_load(data["config-pull.yml"])["storage"]
    assert pull_storage["maintenance"]["readonly"]["enabled"] is True
    model = str(tmp_path / "model")
    # two 12 MiB shards: past the S3 driver's 10 MiB chunk, so multipart uploads run
    modelgen.make_big_model(model, 2, 24 << 20)
    with localregistry.running(storage=push_storage, env=_env(containers["registry"])) as push, \
            localregistry.running(storage=pull_storage,
                                  env=_env(containers["registry-pull"])) as pull:
        ref = reference.parse(f"{push.host}/models/s3-llama:v1")
        res = pack_to_registry(model, RegistryClient(push.host, insecure=True), ref)
        digest = res.reference.rsplit("@", 1)[1]
        out = str(tmp_path / "out")
        pulled = pull_to_dir(RegistryClient(pull.host, insecure=True),
                             reference.parse(f"{pull.host}/models/s3-llama@{digest}"), out)
        assert pulled.digest == digest
        same_tree(model, out)
        # the pull endpoint refuses writes on the shared bucket too
        with pytest.raises(RegistryError):  # 405 from the read-only maintenance mode
            pack_to_registry(model, RegistryClient(pull.host, insecure=True),
                             reference.parse(f"{pull.host}/models/other:v1"))
    keys = set()
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket="dmcr"):
        keys |= {o["Key"] for o in page.get("Contents", [])}
    root = "cluster-a/docker/registry/v2"
    for layer in pulled.layers:
        hexd = layer.digest.split(":", 1)[1]
        assert f"{root}/blobs/sha256/{hexd[:2]}/{hexd}/data" in keys, layer.digest
    assert any(k.startswith(f"{root}/repositories/models/s3-llama/_manifests/tags/v1/")
               for k in keys)
