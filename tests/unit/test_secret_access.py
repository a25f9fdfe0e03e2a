"""controller/delivery/secretaccess.py: which Secrets a Model admission reviews, and the
CRD kept in step with it (a new ``*SecretRef`` field in a Model's spec must be reviewed,
and the webhook's matchConditions must send it)."""

from __future__ import annotations

import os
from typing import Any

import yaml

from controller.delivery import secretaccess, webhookconfig

CRD = os.path.join(os.path.dirname(__file__), "..", "..", "crds", "modelcache.io_models.yaml")


def _ref_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for name, sub in (schema.get("properties") or {}).items():
        if name.endswith("SecretRef"):
            out.add((*path, name))
        out |= _ref_paths(sub, (*path, name))
    return out


def test_every_secret_ref_of_the_crd_is_reviewed() -> None:
    with open(CRD) as f:
        crd = yaml.safe_load(f)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    # a path reviewed that the CRD lacks costs nothing; one the CRD has and we miss leaks
    assert _ref_paths(spec) <= set(secretaccess.SECRET_REF_PATHS)


def model(source: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Model", "spec": {"source": source}}


def test_to_review() -> None:
    hf = model({"huggingFace": {"repo": "o/n", "authSecretRef": {"name": "tok"}}})
    assert secretaccess.to_review(hf, None) == {
        "tok": "spec.source.huggingFace.authSecretRef"}
    assert secretaccess.to_review(model({"http": {"url": "https://x/m"}}), None) == {}
    assert secretaccess.to_review(model({"s3": {"bucket": "bkt", "authSecretRef": {}}}),
                                  None) == {}
    assert secretaccess.to_review({"spec": "garbage"}, None) == {}
    # UPDATE: an unchanged source is not reviewed again; another Secret or URL is
    assert secretaccess.to_review(hf, hf) == {}
    swapped = model({"huggingFace": {"repo": "o/n", "authSecretRef": {"name": "other"}}})
    assert secretaccess.to_review(swapped, hf) == {
        "other": "spec.source.huggingFace.authSecretRef"}
    moved = model({"huggingFace": {"repo": "evil/n", "authSecretRef": {"name": "tok"}}})
    assert set(secretaccess.to_review(moved, hf)) == {"tok"}


def test_requesting_user_and_review_body() -> None:
    assert secretaccess.requesting_user(None) is None
    assert secretaccess.requesting_user({"username": ""}) is None
    user = secretaccess.requesting_user({"username": "alice", "uid": "u1", "groups": ["g"],
                                         "extra": {"scopes": ["a"]}})
    assert user is not None
    assert secretaccess.sar_body(user, "team", "tok")["spec"] == {
        "user": "alice", "uid": "u1", "groups": ["g"], "extra": {"scopes": ["a"]},
        "resourceAttributes": {"namespace": "team", "verb": "get", "group": "",
                               "resource": "secrets", "name": "tok"}}


class _Boom:
    def request(self, *a: Any, **kw: Any) -> Any:
        raise AssertionError("no review for a Model without Secret references")


def test_no_review_without_secret_refs() -> None:
    checker = secretaccess.Checker(_Boom())  # type: ignore[arg-type]
    checker.check({"operation": "CREATE", "namespace": "t",
                   "object": model({"http": {"url": "https://x/m"}})})


def test_model_webhook_entry() -> None:
    hooks = {h["name"]: h for h in webhookconfig.webhooks({"url": "https://x/mutate"})}
    h = hooks["models.modelcache.io"]
    assert h["failurePolicy"] == "Fail" and h["sideEffects"] == "None"
    assert h["rules"] == [{"apiGroups": ["modelcache.io"], "apiVersions": ["*"],
                           "operations": ["CREATE", "UPDATE"], "resources": ["models"],
                           "scope": "Namespaced"}]
    expr = h["matchConditions"][0]["expression"]
    for p in secretaccess.SECRET_REF_PATHS:
        assert "object.spec." + ".".join(p) in expr
