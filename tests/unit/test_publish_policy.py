"""controller/models/policy.py: what a namespaced Model's spec.publish may ask of the
publish Job that runs in the controller's namespace (issue 14, M4)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from controller.models import policy


def model(publish: dict[str, Any], kind: str = "Model") -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": "m", "namespace": "team"},
            "spec": {"source": {"http": {"url": "https://x/m"}}, "publish": publish}}


@pytest.mark.parametrize(("text", "value"), [
    ("4", Decimal(4)), ("500m", Decimal("0.5")), ("16Gi", Decimal(16 << 30)),
    ("1e9", Decimal(10) ** 9), (4294967296, Decimal(4294967296)), (0.5, Decimal("0.5")),
    ("100G", Decimal(10) ** 11), (".5", Decimal("0.5"))])
def test_quantities(text: Any, value: Decimal) -> None:
    assert policy.quantity(text) == value


@pytest.mark.parametrize("text", ["", "4 cores", "-1", "1Gb", "0x10", True, None, "1e99999"])
def test_not_quantities(text: Any) -> None:
    with pytest.raises(ValueError):
        policy.quantity(text)


@pytest.mark.parametrize(("publish", "words"), [
    # the attacks of issue 14: eight GPUs, every taint, a node pool of the tenant's choice
    ({"resources": {"limits": {"nvidia.com/gpu": 8}}},
     "resources.limits[nvidia.com/gpu]=8 exceeds the policy's maximum 0"),
    ({"resources": {"requests": {"cpu": "64"}}}, "resources.requests[cpu]=64 exceeds"),
    ({"resources": {"limits": {"memory": "900Gi"}}}, "maximum 16Gi"),
    ({"resources": {"requests": {"ephemeral-storage": "900Gi"}}}, "maximum 100Gi"),
    ({"resources": {"limits": {"example.com/fpga": 1}}}, "resources.limits[example.com/fpga] "
                                                         "is not allowed"),
    ({"resources": {"limits": {"hugepages-1Gi": "64Gi"}}}, "hugepages-1Gi] is not allowed"),
    ({"resources": {"claims": [{"name": "gpu"}]}}, "resources.claims is not allowed"),
    ({"tolerations": [{"operator": "Exists"}]}, "tolerations[0] has no key"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists"}]},
     "tolerations[0] gpu (every effect) is not allowed"),
    ({"nodeSelector": {"pool": "a100"}}, "nodeSelector pool=a100 is not allowed (allowed: none)"),
])
def test_default_policy_refuses(publish: dict[str, Any], words: str) -> None:
    why = policy.refusal(policy.DEFAULT, model(publish))
    assert why is not None and words in why, why


def test_default_policy_allows_a_modest_job() -> None:
    ok = {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                        "limits": {"cpu": 4, "memory": 4294967296,
                                   "ephemeral-storage": "100Gi", "nvidia.com/gpu": 0}}}
    assert policy.refusal(policy.DEFAULT, model(ok)) is None
    assert policy.refusal(policy.DEFAULT, model({})) is None
    assert policy.refusal(policy.DEFAULT, {"kind": "Model", "metadata": {}, "spec": {}}) is None


def test_cluster_models_are_the_admins_own() -> None:
    wild = {"resources": {"limits": {"nvidia.com/gpu": 8}}, "nodeSelector": {"pool": "a100"},
            "tolerations": [{"operator": "Exists"}]}
    assert policy.refusal(policy.DEFAULT, model(wild, kind="ClusterModel")) is None
    # a body without a kind is a Model: checked
    assert policy.refusal(policy.DEFAULT, {**model(wild), "kind": None}) is not None


def test_admin_lists_what_tenants_may_use() -> None:
    p = policy.from_flags(["pool=publish", "zone"], ["publish", "spot:NoSchedule"],
                          ["nvidia.com/gpu=1", "cpu=8"])
    ok = {"nodeSelector": {"pool": "publish", "zone": "any-zone"},
          "tolerations": [{"key": "publish", "operator": "Exists"},
                          {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
          "resources": {"limits": {"nvidia.com/gpu": 1, "cpu": 8, "memory": "16Gi"}}}
    assert policy.refusal(p, model(ok)) is None
    for bad, words in [
            ({"nodeSelector": {"pool": "a100"}}, "allowed: pool=publish, zone"),
            ({"tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoExecute"}]},
             "spot:NoExecute is not allowed"),
            ({"tolerations": [{"key": "spot", "operator": "Exists"}]}, "every effect"),
            ({"resources": {"limits": {"nvidia.com/gpu": 2}}}, "maximum 1"),
            ({"resources": {"limits": {"memory": "17Gi"}}}, "maximum 16Gi")]:  # default kept
        why = policy.refusal(p, model(bad))
        assert why is not None and words in why, (bad, why)


@pytest.mark.parametrize(("sel", "tol", "res"), [
    ([], [], ["cpu"]), ([], [], ["cpu=lots"]), ([], [], ["cpu=-1"]), ([], ["gpu:Never"], []),
    ([], [""], []), (["=v"], [], [])])
def test_bad_flags_are_refused(sel: list[str], tol: list[str], res: list[str]) -> None:
    with pytest.raises(ValueError):
        policy.from_flags(sel, tol, res)
