"""The DMCR over TLS (controller/dmcrtls.py), on the real kube-apiserver with the
controller's own RBAC (daemonset/controller-rbac.yaml) and a real docker-registry:

* the certificate the controller keeps in ``modelcache-dmcr-tls`` is served by
  docker-registry and a ``RegistryClient`` given the published CA (the
  ConfigMap's ``ca.crt``) pushes and pulls; one without it is refused;
* renewal (the clock moved past the renew point) gives a new certificate and
  patches its fingerprint on the dmcr Deployment's pod template, so it rolls;
* a publish or materializer Job of a manager with a CA carries the CA as a file
  of its Secret and no plain-HTTP flag.
"""

from __future__ import annotations

import base64
import datetime
import os
import uuid
from collections.abc import Iterator

import pytest

from cli.local import registry as localregistry
from controller import dmcrtls
from controller.delivery import materializer
from controller.models import publishjob as jobs
from kube import certs
from kube import client as k
from modelpack.errors import ModelPackError
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_dir
from tests import kubeenv
from tests.integration.test_catalog_api import SYSTEM_NS, apply_controller_rbac
from tests.integration.test_controller import ensure_namespace
from tests.servers.helpers import same_tree

kube = kubeenv.kube


@pytest.fixture(scope="module")
def controller(kube: kubeenv.KubeEnv) -> Iterator[tuple[k.Kube, k.Kube]]:
    """(administrator, the controller's own ServiceAccount) clients."""
    admin = k.Kube.from_config(kube.kubeconfig)
    ensure_namespace(admin, SYSTEM_NS)
    apply_controller_rbac(kube)
    own = k.Kube.from_config(kube.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS))
    yield admin, own
    own.close()
    admin.close()


def dmcr_deployment(admin: k.Kube) -> None:
    """The dmcr Deployment as installed (only stored: no controller-manager runs)."""
    labels = {"app.kubernetes.io/component": "dmcr"}
    try:
        admin.delete(k.DEPLOYMENTS, "dmcr", SYSTEM_NS, propagation=None)
    except k.NotFound:
        pass
    admin.create(k.DEPLOYMENTS, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "dmcr", "namespace": SYSTEM_NS},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "registry", "image": "registry:2.8.3"}]}}}},
        SYSTEM_NS)


def template_annotation(admin: k.Kube) -> str | None:
    dep = admin.get(k.DEPLOYMENTS, "dmcr", SYSTEM_NS)
    return (dep["spec"]["template"]["metadata"].get("annotations") or {}).get(
        dmcrtls.ANN_FINGERPRINT)


def config(tmp_path, secret: str) -> dmcrtls.Config:
    return dmcrtls.Config(namespace=SYSTEM_NS, secret=secret, extra_hosts=("127.0.0.1",),
                          ca_file=str(tmp_path / "registry-ca.crt"))


def secret_files(admin: k.Kube, secret: str, where) -> tuple[str, str]:
    data = admin.get(k.SECRETS, secret, SYSTEM_NS)["data"]
    out = []
    for key in ("tls.crt", "tls.key"):
        path = where / key
        path.write_bytes(base64.b64decode(data[key]))
        out.append(str(path))
    return out[0], out[1]


def test_dmcr_serves_the_controller_issued_certificate(controller, tmp_path,
                                                       small_model) -> None:
    admin, own = controller
    dmcr_deployment(admin)
    secret = f"dmcr-tls-{uuid.uuid4().hex[:6]}"
    cfg = config(tmp_path, secret)
    bundle = dmcrtls.RegistryTLS(own, cfg).sync()  # as the controller: its own RBAC
    cm = admin.get(k.CONFIGMAPS, cfg.ca_configmap, SYSTEM_NS)
    assert cm["data"][dmcrtls.CA_KEY].encode() == bundle.ca_bundle
    assert b"PRIVATE KEY" not in cm["data"][dmcrtls.CA_KEY].encode()
    ca = tmp_path / "ca-from-configmap.crt"  # what a node mounts
    ca.write_text(cm["data"][dmcrtls.CA_KEY])
    assert template_annotation(admin) == certs.fingerprint(bundle.cert)
    with localregistry.running(root=str(tmp_path / "reg"),
                               tls=secret_files(admin, secret, tmp_path)) as reg:
        pusher = RegistryClient(reg.host, ca_bundle=cfg.ca_file)  # the manager's own file
        digest = pack_to_registry(small_model, pusher,
                                  parse(f"{reg.host}/tls/m:v1")).pack.digest
        dest = str(tmp_path / "out")
        pull_to_dir(RegistryClient(reg.host, ca_bundle=str(ca)),
                    parse(f"{reg.host}/tls/m@{digest}"), dest)
        same_tree(small_model, dest)
        with pytest.raises(ModelPackError):  # no CA given: the system CAs do not know it
            RegistryClient(reg.host, retries=0).get_manifest(parse(f"{reg.host}/tls/m:v1"))


def test_renewal_rolls_the_dmcr(controller, tmp_path) -> None:
    admin, own = controller
    dmcr_deployment(admin)
    secret = f"dmcr-tls-{uuid.uuid4().hex[:6]}"
    cfg = config(tmp_path, secret)
    first = dmcrtls.RegistryTLS(own, cfg).sync()
    fp = template_annotation(admin)
    assert fp == certs.fingerprint(first.cert)
    again = dmcrtls.RegistryTLS(own, cfg).sync()  # another replica, nothing due
    assert again.cert == first.cert and template_annotation(admin) == fp
    later = datetime.datetime.now(datetime.UTC) + dmcrtls.CERT_LIFETIME * 0.7
    renewed = dmcrtls.RegistryTLS(own, cfg, clock=lambda: later).sync()
    assert renewed.cert != first.cert
    assert renewed.ca_bundle == first.ca_bundle  # the same CA: clients need nothing new
    assert template_annotation(admin) == certs.fingerprint(renewed.cert) != fp


def test_jobs_trust_the_ca_instead_of_plain_http(tmp_path) -> None:
    ca = tmp_path / "registry-ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    settings = jobs.Settings(namespace=SYSTEM_NS, registry="dmcr.modelcache-system.svc:5000",
                             registry_secret="dmcr-credentials", registry_ca=str(ca))
    obj = {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
           "metadata": {"name": "m", "namespace": "team-a", "uid": "u1"},
           "spec": {"source": {"http": {"url": "https://models.example/m.tar"}}}}
    plan = jobs.Plan(kind="publish", uri="https://models.example/m.tar")
    job = jobs.build(obj, plan, "k1", settings)
    box = job["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in box["command"] if "insecure" in a]
    env = {e["name"]: e.get("value") for e in box["env"]}
    assert env["MODELCACHE_REGISTRY_CA_FILE"] == "/var/run/modelcache/secrets/ca.crt"
    secret = jobs.job_secret(obj, job["metadata"]["name"], plan, settings,
                             {"username": "dQ==", "password": "cA=="}, ca.read_bytes())
    assert base64.b64decode(secret["data"]["ca.crt"]) == ca.read_bytes()
    pvc = {"metadata": {"name": "shared", "namespace": "team-a", "uid": "u2"}}
    mat = materializer.build_job(pvc, "sha256:" + "a" * 64,
                                 "dmcr.modelcache-system.svc:5002/m@sha256:" + "a" * 64,
                                 settings, True)
    box = mat["spec"]["template"]["spec"]["containers"][0]
    assert "--insecure" not in box["command"]
    assert {e["name"] for e in box["env"]} >= {"MODELCACHE_REGISTRY_CA_FILE"}
    assert os.path.basename(
        {e["name"]: e["value"] for e in box["env"]}["MODELCACHE_REGISTRY_CA_FILE"]) == "ca.crt"
