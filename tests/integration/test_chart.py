"""charts/modelcache: ``helm lint``, ``helm template``, and every rendered object
through ``kubectl apply --dry-run=server`` against the real kube-apiserver.

helm is built by hack/install.d/helm.sh (cached under ~/.cache/modelcache-tools;
``$HELM`` overrides). The chart must render the same objects as the plain
manifests in daemonset/ (plus the Secrets it generates), and ship the CRDs of
crds/ byte for byte.
"""

from __future__ import annotations

import base64
import glob
import os
import subprocess
import uuid
from typing import Any

import pytest
import yaml

from tests import kubeenv
from tests.integration.test_crds import install_crds

kube = kubeenv.kube

CHART = os.path.join(kubeenv.REPO_ROOT, "charts", "modelcache")
MANIFESTS = os.path.join(kubeenv.REPO_ROOT, "daemonset")
HELM_VERSION = "v3.19.5"  # hack/install.d/helm.sh
KUBE_VERSION = kubeenv.versions()["KUBE_VERSION"]


@pytest.fixture(scope="module")
def helm() -> str:
    path = os.environ.get("HELM") or os.path.join(kubeenv.TOOLS, f"helm-{HELM_VERSION}", "helm")
    if not os.access(path, os.X_OK):
        pytest.fail(f"helm not built: {path} (run hack/install.d/helm.sh)")
    return path


def render(helm: str, namespace: str, *sets: str) -> list[dict[str, Any]]:
    args = [helm, "template", "mc", CHART, "--namespace", namespace,
            "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def ids(objs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objs}


def manifests() -> list[dict[str, Any]]:
    out = []
    for path in sorted(glob.glob(os.path.join(MANIFESTS, "*.yaml"))):
        if os.path.basename(path) == "kustomization.yaml":
            continue
        with open(path) as f:
            out += [d for d in yaml.safe_load_all(f) if d]
    return out


def test_helm_lint(helm: str) -> None:
    done = subprocess.run([helm, "lint", CHART, "--kube-version", KUBE_VERSION],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


def test_chart_crds_are_the_repo_crds() -> None:
    repo = sorted(os.listdir(os.path.join(kubeenv.REPO_ROOT, "crds")))
    assert sorted(os.listdir(os.path.join(CHART, "crds"))) == repo
    for name in repo:
        with open(os.path.join(kubeenv.REPO_ROOT, "crds", name), "rb") as a, \
                open(os.path.join(CHART, "crds", name), "rb") as b:
            assert a.read() == b.read(), f"charts/modelcache/crds/{name} differs from crds/{name}"


def test_rendered_kinds(helm: str) -> None:
    objs = render(helm, "modelcache-system")
    assert ids(objs) == {
        ("CSIDriver", "nodecache.modelcache.io"),
        ("ClusterRole", "modelcache-controller"), ("ClusterRole", "modelcache-node"),
        ("ClusterRole", "modelcache:catalog:reader"),
        ("ClusterRole", "modelcache-edit"), ("ClusterRole", "modelcache-view"),
        ("ClusterRole", "modelcache-clustermodels-view"),
        ("ClusterRoleBinding", "modelcache-controller"),
        ("ClusterRoleBinding", "modelcache-node"),
        ("Role", "modelcache-controller"), ("RoleBinding", "modelcache-controller"),
        ("ServiceAccount", "modelcache-controller"), ("ServiceAccount", "modelcache-node"),
        ("ServiceAccount", "modelcache-publish"),
        ("Deployment", "modelcache-controller"), ("Service", "modelcache-controller"),
        ("Deployment", "dmcr"), ("Service", "dmcr"), ("ConfigMap", "dmcr-config"),
        ("PersistentVolumeClaim", "dmcr-data"),
        ("Secret", "dmcr-htpasswd"), ("Secret", "dmcr-credentials"),
        ("Secret", "dmcr-pull-credentials"),
        ("Secret", "modelcache-report-key"),
        ("DaemonSet", "modelcache-node"),
        ("ServiceAccount", "modelcache-upload-gateway"),
        ("Deployment", "modelcache-upload-gateway"), ("Service", "modelcache-upload-gateway"),
        ("Secret", "modelcache-upload-admin-token"),
        ("NetworkPolicy", "modelcache-controller"), ("NetworkPolicy", "dmcr"),
        ("NetworkPolicy", "modelcache-upload-gateway"),
    }
    # the same objects as the plain manifests, but for the generated Secrets
    # and the Namespace (Helm installs into the release namespace)
    plain = ids(manifests()) - {("Namespace", "modelcache-system")}
    generated = {i for i in ids(objs) if i[0] == "Secret"}
    assert ids(objs) - generated == plain


def test_rendered_objects_match_manifests(helm: str) -> None:
    """Spot checks that templating kept the manifests' substance."""
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render(helm, "modelcache-system")}
    plain = {(o["kind"], o["metadata"]["name"]): o for o in manifests()}
    for key in [("ClusterRole", "modelcache-controller"), ("Role", "modelcache-controller"),
                ("ClusterRole", "modelcache-node"), ("CSIDriver", "nodecache.modelcache.io")]:
        assert objs[key].get("rules", objs[key].get("spec")) == \
            plain[key].get("rules", plain[key].get("spec")), key
    for key in [("Deployment", "modelcache-controller"), ("Deployment", "dmcr"),
                ("DaemonSet", "modelcache-node"), ("Deployment", "modelcache-upload-gateway")]:
        a, b = objs[key]["spec"]["template"]["spec"], plain[key]["spec"]["template"]["spec"]
        assert a["volumes"] == b["volumes"], key
        for ca, cb in zip(a["containers"], b["containers"], strict=True):
            # the chart adds only --log-level (a value) to the plain arguments
            assert [x for x in ca.get("args", []) if not x.startswith("--log-level")] == \
                cb.get("args", []), key
            assert ca["image"] == cb["image"] and ca.get("volumeMounts") == cb.get("volumeMounts")
            for probe in ("livenessProbe", "readinessProbe", "securityContext", "ports"):
                assert ca.get(probe) == cb.get(probe), (key, probe)
        assert a.get("securityContext") == b.get("securityContext"), key
        assert a.get("serviceAccountName") == b.get("serviceAccountName"), key
    for key in [("Service", "modelcache-upload-gateway"), ("Service", "modelcache-controller")]:
        assert objs[key]["spec"]["ports"] == plain[key]["spec"]["ports"], key
    cfg = yaml.safe_load(objs[("ConfigMap", "dmcr-config")]["data"]["config.yml"])
    assert cfg["storage"]["delete"]["enabled"] is True
    assert cfg["auth"]["htpasswd"]["path"] == "/auth/htpasswd"


def test_values_change_the_rendering(helm: str) -> None:
    objs = render(helm, "ai", "node.enabled=false", "dmcr.password=s3cret",
                  "node.kubeletRoot=/var/lib/k0s/kubelet", "controller.hfEndpoint=https://hf.local")
    assert not {i for i in ids(objs) if i[0] in ("DaemonSet", "CSIDriver")}
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    creds = by[("Secret", "dmcr-credentials")]["data"]
    assert base64.b64decode(creds["password"]) == b"s3cret"
    htpasswd = base64.b64decode(by[("Secret", "dmcr-htpasswd")]["data"]["htpasswd"]).decode()
    assert htpasswd.startswith("modelcache:$2")  # bcrypt, never the clear password
    args = by[("Deployment", "modelcache-controller")]["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--registry=dmcr.ai.svc:5000" in args and "--hf-endpoint=https://hf.local" in args
    assert all(o["metadata"].get("namespace") in (None, "ai") for o in objs)
    k0s = render(helm, "ai", "node.kubeletRoot=/var/lib/k0s/kubelet")
    ds = next(o for o in k0s if o["kind"] == "DaemonSet")
    paths = [v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"]
             if "hostPath" in v]
    assert "/var/lib/k0s/kubelet/pods" in paths
    node_args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--pull-via=dmcr.ai.svc:5000=dmcr.ai.svc:5002" in node_args
    secrets = [v["secret"]["secretName"] for v in ds["spec"]["template"]["spec"]["volumes"]
               if "secret" in v]
    assert secrets == ["dmcr-pull-credentials"]  # never the push user


def _dry_run(kube: kubeenv.KubeEnv, objs: list[dict[str, Any]]) -> str:
    done = kube.kubectl("apply", "--dry-run=server", "-f", "-", check=False,
                        input=yaml.safe_dump_all(objs))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_rendered_objects_pass_server_dry_run(kube: kubeenv.KubeEnv, helm: str) -> None:
    install_crds(kube)
    ns = f"mc-chart-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", ns)
    objs = render(helm, ns)
    out = _dry_run(kube, objs)
    for kind, name in ids(objs):
        assert f"/{name} created (server dry run)" in out, (kind, name, out)


def test_manifests_pass_server_dry_run(kube: kubeenv.KubeEnv) -> None:
    kube.kubectl("apply", "-f", os.path.join(MANIFESTS, "controller-namespace.yaml"))
    objs = [o for o in manifests() if o["kind"] != "Namespace"]
    out = _dry_run(kube, objs)
    assert out.count("created (server dry run)") == len(objs), out


def test_dmcr_pull_endpoint_is_read_only(helm: str) -> None:
    """The pull endpoint (nodes, materializers) shares the storage read-only,
    behind the controller's token realm, in the chart and in the plain manifests alike."""
    for objs in (render(helm, "modelcache-system"), manifests()):
        by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
        cfg = yaml.safe_load(by[("ConfigMap", "dmcr-config")]["data"]["config-pull.yml"])
        assert cfg["storage"]["maintenance"]["readonly"] == {"enabled": True}
        assert cfg["auth"]["token"]["rootcertbundle"] == "/token/tls.crt"
        assert cfg["auth"]["token"]["realm"].startswith("https://modelcache-controller.")
        pod = by[("Deployment", "dmcr")]["spec"]["template"]["spec"]
        pull = next(c for c in pod["containers"] if c["name"] == "registry-pull")
        mounts = {m["name"]: m for m in pull["volumeMounts"]}
        assert mounts["data"]["readOnly"] is True and "htpasswd" not in mounts
        token = next(v for v in pod["volumes"] if v["name"] == "token")["secret"]
        assert token["items"] == [{"key": "tls.crt", "path": "tls.crt"}]  # never the key
        ports = {p["name"]: p["port"] for p in by[("Service", "dmcr")]["spec"]["ports"]}
        assert ports == {"registry": 5000, "pull": 5002}


def _pod(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    obj = next(o for o in objs if (o["kind"], o["metadata"]["name"]) == (kind, name))
    return obj["spec"]["template"]  # type: ignore[no-any-return]


def _args(pod: dict[str, Any], container: str | None = None) -> list[str]:
    c = next(c for c in pod["spec"]["containers"] if container in (None, c["name"]))
    return c["args"]  # type: ignore[no-any-return]


def test_upload_gateway_is_wired(helm: str) -> None:
    """The gateway runs the controller image with its own token-less account, the push
    user and a bounded staging emptyDir; the manager is pointed at its Service."""
    for objs, ns in ((render(helm, "ai"), "ai"), (manifests(), "modelcache-system")):
        by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
        gw = _pod(objs, "Deployment", "modelcache-upload-gateway")
        spec, args = gw["spec"], _args(gw)
        assert args[0] == "upload-gateway"
        assert by[("Deployment", "modelcache-upload-gateway")]["spec"]["strategy"] == \
            {"type": "Recreate"}
        assert spec["containers"][0]["image"] == \
            _pod(objs, "Deployment", "modelcache-controller")["spec"]["containers"][0]["image"]
        sa = by[("ServiceAccount", "modelcache-upload-gateway")]
        assert sa["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == "modelcache-upload-gateway"
        assert spec["automountServiceAccountToken"] is False
        # no Role or binding names the gateway: it never calls the API server
        assert not [o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
                    and any(s.get("name") == "modelcache-upload-gateway"
                            for s in o.get("subjects", []))]
        c = spec["containers"][0]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        vols = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        staging = vols[mounts["/var/lib/modelcache-upload"]]["emptyDir"]
        assert "--root=/var/lib/modelcache-upload" in args
        assert f"--max-staging-bytes={staging['sizeLimit']}" in args  # refuses before eviction
        assert vols["registry"]["secret"]["secretName"] == "dmcr-credentials"  # it pushes
        assert "--registry-username-file=/etc/modelcache/registry/username" in args
        assert "--registry-password-file=/etc/modelcache/registry/password" in args
        assert vols["admin-token"]["secret"]["secretName"] == "modelcache-upload-admin-token"
        url = f"http://modelcache-upload-gateway.{ns}.svc:8444"
        assert f"--public-url={url}" in args
        manager = _pod(objs, "Deployment", "modelcache-controller")
        assert f"--upload-gateway-url={url}" in _args(manager)
        assert "--upload-admin-token-file=/etc/modelcache/upload/token" in _args(manager)
        mvols = {v["name"]: v for v in manager["spec"]["volumes"]}
        assert mvols["upload-admin-token"]["secret"]["secretName"] == \
            "modelcache-upload-admin-token"


def test_upload_gateway_values(helm: str) -> None:
    objs = render(helm, "ai", "uploadGateway.staging.sizeLimit=20Gi",
                  "uploadGateway.publicURL=https://uploads.example.com",
                  "uploadGateway.service.port=9000", "uploadGateway.replicas=0")
    gw = _pod(objs, "Deployment", "modelcache-upload-gateway")
    assert "--max-staging-bytes=20Gi" in _args(gw)
    assert "--public-url=https://uploads.example.com" in _args(gw)
    assert {"name": "staging", "emptyDir": {"sizeLimit": "20Gi"}} in gw["spec"]["volumes"]
    assert "--upload-gateway-url=http://modelcache-upload-gateway.ai.svc:9000" in \
        _args(_pod(objs, "Deployment", "modelcache-controller"))
    off = render(helm, "ai", "uploadGateway.enabled=false")
    assert not [i for i in ids(off) if "upload" in i[1]]
    manager = _pod(off, "Deployment", "modelcache-controller")
    assert not [a for a in _args(manager) if a.startswith("--upload-")]
    assert "upload-admin-token" not in {v["name"] for v in manager["spec"]["volumes"]}
    done = subprocess.run([helm, "template", "mc", CHART, "--kube-version", KUBE_VERSION,
                           "--set", "uploadGateway.replicas=2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "uploadGateway.replicas: at most 1" in done.stderr


def test_catalog_tls_values(helm: str) -> None:
    """Without tlsSecret the replicas share the Secret the manager keeps (its default
    --catalog-ca-secret); with one, it is read through the API, not mounted."""
    shared = _args(_pod(render(helm, "ai", "distribution.mode=PublicCatalog",
                               "distribution.catalog.hosts={catalog.example.com}"),
                        "Deployment", "modelcache-controller"))
    assert "--distribution-mode=PublicCatalog" in shared
    assert not [a for a in shared if a.startswith(("--catalog-tls-secret", "--catalog-tls-cert"))]
    assert "--catalog-tls-host=catalog.example.com" in shared
    given = render(helm, "ai", "distribution.mode=PublicCatalog",
                   "distribution.catalog.tlsSecret=my-catalog-tls")
    pod = _pod(given, "Deployment", "modelcache-controller")
    assert "--catalog-tls-secret=my-catalog-tls" in _args(pod)
    assert "my-catalog-tls" not in str(pod["spec"]["volumes"])


def test_a_new_dmcr_password_restarts_what_reads_it_at_start(helm: str) -> None:
    """The DMCR and the manager pods change with dmcr.password (and only then: a render
    of the same values keeps them, whatever bcrypt salt the htpasswd Secret got)."""
    def checksums(*sets: str) -> tuple[str, str]:
        objs = render(helm, "ai", *sets)
        return (_pod(objs, "Deployment", "dmcr")["metadata"]["annotations"]["checksum/htpasswd"],
                _pod(objs, "Deployment", "modelcache-controller")["metadata"]["annotations"][
                    "checksum/credentials"])

    one = checksums("dmcr.password=one")
    assert checksums("dmcr.password=one") == one
    two = checksums("dmcr.password=two")
    assert two[0] != one[0] and two[1] != one[1]
    # the node plugin and the gateway re-read their mounted credentials instead
    objs = render(helm, "ai", "dmcr.password=two")
    assert not [k for k in _pod(objs, "DaemonSet", "modelcache-node")["metadata"]
                ["annotations"] if k.startswith("checksum/")]
