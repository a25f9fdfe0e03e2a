"""The test API server itself (tests/kubeenv.py): real etcd + kube-apiserver.

Proves what later controller tests rely on: CRDs can be installed and served,
the real kubectl talks to it with the generated kubeconfig, and RBAC is
enforced (a ServiceAccount token with no bindings gets 403).
"""

from __future__ import annotations

import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests import kubeenv

kube = kubeenv.kube

GROUP = "kubeenv.test.modelcache.io"
PLURAL = "widgets"


def _wait_established(api: client.ApiextensionsV1Api, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = api.read_custom_resource_definition(name)
        for cond in (crd.status and crd.status.conditions) or []:
            if cond.type == "Established" and cond.status == "True":
                return
        time.sleep(0.1)
    raise AssertionError(f"CRD {name} not Established after {timeout}s")


@pytest.fixture(scope="module")
def widget_crd(kube: kubeenv.KubeEnv) -> str:
    ext = client.ApiextensionsV1Api(kube.api_client())
    name = f"{PLURAL}.{GROUP}"
    ext.create_custom_resource_definition(client.V1CustomResourceDefinition(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1CustomResourceDefinitionSpec(
            group=GROUP, scope="Namespaced",
            names=client.V1CustomResourceDefinitionNames(plural=PLURAL, singular="widget",
                                                         kind="Widget"),
            versions=[client.V1CustomResourceDefinitionVersion(
                name="v1", served=True, storage=True,
                subresources=client.V1CustomResourceSubresources(status={}),
                schema=client.V1CustomResourceValidation(open_apiv3_schema=client.V1JSONSchemaProps(
                    type="object",
                    properties={"spec": client.V1JSONSchemaProps(
                        type="object", required=["size"],
                        properties={"size": client.V1JSONSchemaProps(type="integer", minimum=1)},
                    )},
                )),
            )],
        ),
    ))
    _wait_established(ext, name)
    return name


def test_crd_object_roundtrip(kube: kubeenv.KubeEnv, widget_crd: str) -> None:
    api = client.CustomObjectsApi(kube.api_client())
    name = f"w-{uuid.uuid4().hex[:8]}"
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget",
            "metadata": {"name": name}, "spec": {"size": 3}}
    api.create_namespaced_custom_object(GROUP, "v1", "default", PLURAL, body)

    got = api.get_namespaced_custom_object(GROUP, "v1", "default", PLURAL, name)
    assert isinstance(got, dict)
    assert got["spec"] == {"size": 3}
    assert got["metadata"]["uid"]

    # the schema is enforced by the API server, not by the client
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(GROUP, "v1", "default", PLURAL, {
            **body, "metadata": {"name": f"{name}-bad"}, "spec": {"size": 0}})
    assert err.value.status == 422
    assert "spec.size" in str(err.value.body)


def test_kubectl_with_generated_kubeconfig(kube: kubeenv.KubeEnv, widget_crd: str) -> None:
    assert kube.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    out = kube.kubectl("get", PLURAL, "-n", "default", "-o", "name").stdout
    assert out.strip() == "" or out.startswith("widget.")
    version = kube.kubectl("version", "-o", "json").stdout
    assert kubeenv.versions()["KUBE_VERSION"] in version


def test_rbac_denies_unprivileged_serviceaccount(kube: kubeenv.KubeEnv) -> None:
    sa_config = kube.serviceaccount_kubeconfig("nobody")
    core = client.CoreV1Api(kube.api_client(sa_config))

    # authenticated (a bad token would be 401), but not authorized
    with pytest.raises(ApiException) as err:
        core.list_namespaced_config_map("default")
    assert err.value.status == 403
    assert "system:serviceaccount:default:nobody" in str(err.value.body)

    denied = kube.kubectl("get", "secrets", "-n", "default", kubeconfig=sa_config, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()

    who = kube.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                       kubeconfig=sa_config)
    assert who.stdout == "system:serviceaccount:default:nobody"
