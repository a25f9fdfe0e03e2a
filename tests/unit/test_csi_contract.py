"""The node plugin's side of the delivery contract, and its pure Kubernetes-side logic.

``csi`` takes every name of the contract from ``api/names.py``; these tests
check that no csi module spells one of them again, and that what the node
writes and parses is the contract's. Also: the merge patch of node labels,
the trimming of Model objects, the prefetch selector and the inference of
the Kubernetes flags (no API server needed; tests/integration/test_csi_kube.py
runs all of it against a real one).
"""

from __future__ import annotations

import ast
import hashlib
import pathlib

import pytest

import csi
from api import names as contract
from csi import identity, main, nodelabels, prefetch
from csi.resolvers import base as resolver
from csi.resolvers.kube import model_entry, trim

DIGESTS = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(5)]


def test_names_are_the_contracts() -> None:
    assert identity.DRIVER_NAME == contract.CSI_DRIVER
    for d in DIGESTS:
        label = contract.node_label(d)
        assert nodelabels.OURS.match(label)  # the labels the node removes are the contract's
        assert len(label.split("/", 1)[1]) <= 63  # a valid label name part


def test_csi_spells_no_name_of_the_contract_again() -> None:
    """Every "modelcache.io" name the node uses comes from api.names, never a literal."""
    root = pathlib.Path(csi.__file__).parent
    spelled = []
    for path in sorted(root.rglob("*.py")):
        if "gen" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and "modelcache.io" in node.value and "\n" not in node.value:
                spelled.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert not spelled, spelled


def test_volume_reads_the_contract_attributes() -> None:
    v = resolver.Volume.from_context({contract.ATTR_MODEL: "qwen",
                                      contract.ATTR_DIGEST: DIGESTS[0],
                                      resolver.NAMESPACE_KEY: "team-a"})
    assert (v.namespace, v.model, v.digest) == ("team-a", "qwen", DIGESTS[0])
    v = resolver.Volume.from_context({contract.ATTR_CLUSTER_MODEL: "llama"})
    assert v.cluster_model == "llama"


def test_label_patch_adds_removes_and_leaves_foreign_labels() -> None:
    current = {
        "kubernetes.io/hostname": "n1",
        contract.node_label(DIGESTS[0]): "true",  # still cached: kept, not re-sent
        contract.node_label(DIGESTS[1]): "true",  # evicted: removed
        contract.node_label(DIGESTS[2]): "false",  # wrong value: set again
        "nodecache.modelcache.io/pool": "fast",  # our prefix, not our shape: untouched
        "nodecache.modelcache.io/sha256-abc": "true",  # too short: not ours either
    }
    patch = nodelabels.label_patch(current, [DIGESTS[0], DIGESTS[2], DIGESTS[3]])
    assert patch == {contract.node_label(DIGESTS[1]): None,
                     contract.node_label(DIGESTS[2]): "true",
                     contract.node_label(DIGESTS[3]): "true"}
    assert nodelabels.label_patch({contract.node_label(DIGESTS[0]): "true"},
                                  [DIGESTS[0]]) == {}


def _model(phase: str, **status: object) -> dict[str, object]:
    return {"kind": "Model", "metadata": {"name": "qwen", "namespace": "team-a"},
            "spec": {"delivery": {"nodeCache": {"pin": True,
                                                "prefetch": {"nodeSelector": {"gpu": "h100"}}}}},
            "status": {"phase": phase, **status}}


def test_model_entry_ready_pinned_and_not_ready() -> None:
    art = {"digest": DIGESTS[0], "reference": "reg:5000/models/team-a/qwen:v1"}
    e = model_entry(_model("Ready", artifact=art))
    assert not e.problem and e.pin and e.prefetch == {"gpu": "h100"}
    assert str(e.reference()) == f"reg:5000/models/team-a/qwen@{DIGESTS[0]}"
    # a pinned digest stays in the model's own repository
    assert str(e.reference(DIGESTS[1])) == f"reg:5000/models/team-a/qwen@{DIGESTS[1]}"
    pub = model_entry(_model("Publishing", conditions=[
        {"type": "Ready", "status": "False", "message": "42% done"}]))
    assert pub.problem == "phase is Publishing (42% done)"
    assert "no reference" in model_entry(_model("Ready", artifact={"digest": DIGESTS[0]})).problem
    bad = model_entry(_model("Ready", artifact={"digest": "sha256:xyz", "reference": "r/x"}))
    assert "invalid" in bad.problem


def test_trimmed_models_read_the_same() -> None:
    """The informers cache ``trim``-ed objects: trimming keeps all a publish reads."""
    art = {"digest": DIGESTS[0], "reference": "reg:5000/models/team-a/qwen:v1"}
    for obj in (_model("Ready", artifact=art), _model("Publishing", conditions=[
            {"type": "Ready", "status": "False", "message": "42% done"}])):
        assert model_entry(trim(obj)) == model_entry(obj)
    cluster = {"metadata": {"name": "llama"}, "status": {"phase": "Ready", "artifact": art}}
    assert model_entry(trim(cluster)).what == "ClusterModel 'llama'"


def test_prefetch_selector_semantics() -> None:
    assert prefetch.selects({"gpu": "h100"}, {"gpu": "h100", "zone": "a"})
    assert not prefetch.selects({"gpu": "h100"}, {"gpu": "a100"})
    assert not prefetch.selects({"gpu": "h100"}, {})
    assert prefetch.selects({}, {"anything": "x"})  # empty selects every node


@pytest.mark.parametrize("argv,env,expect", [
    (["--models-file", "m.yaml"], {}, ("file", False, False)),
    (["--models-file", "m.yaml"], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, ("file", False, False)),
    (["--kubeconfig", "kc"], {}, ("kube", True, True)),
    ([], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, ("kube", True, True)),
    (["--resolver", "kube", "--no-prefetch", "--no-node-labels"],
     {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, ("kube", False, False)),
    (["--models-file", "m", "--kubeconfig", "kc", "--node-labels"], {}, ("file", True, False)),
    ([], {}, (None, False, False)),
])
def test_kube_flags_are_inferred(argv, env, expect, monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = main.parser().parse_args(["--endpoint", "unix:///x.sock", "--cache-dir", "/c",
                                     "--node-id", "n", *argv])
    assert main.settle_kube_flags(args) is None
    assert (args.resolver, args.node_labels, args.prefetch) == expect


@pytest.mark.parametrize("argv,message", [
    (["--resolver", "file"], "needs --models-file"),
    (["--resolver", "kube", "--models-file", "m"], "exclude each other"),
    (["--models-file", "m", "--prefetch"], "needs --resolver kube"),
    (["--resolver", "kube"], "no API server"),
    (["--models-file", "m", "--node-labels"], "no API server"),
])
def test_kube_flags_that_clash_are_refused(argv, message, monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    args = main.parser().parse_args(["--endpoint", "unix:///x.sock", "--cache-dir", "/c",
                                     "--node-id", "n", *argv])
    assert message in (main.settle_kube_flags(args) or "")


def test_help_explains_the_kubernetes_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        main.parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--kubeconfig PATH", "--resolver {file,kube}", "--node-labels, --no-node-labels",
                 "--prefetch, --no-prefetch", "--kube-max-stale"):
        assert flag in out
    assert "service account" in out and "nodeSelector" in out
