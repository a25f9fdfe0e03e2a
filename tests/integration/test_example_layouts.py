"""The runtime examples deliver trees their servers load, declared Raw.

examples/workloads/{distributed-llama,triton,torchserve}.yaml each define a
Model with ``format: Raw`` and a workload that reads it. Here:

* the layout checkers (``tests/layouts.py``, Triton's and TorchServe's
  documented rules) accept the generated trees and refuse each broken rule;
* each workload's arguments point where its Model is mounted;
* each example Model, its URL swapped for a loopback file server holding a
  tiny generated tree of the same shape, is published by the real worker to
  the real registry, pulled back as a node would, and the pulled tree passes
  the checker with every byte equal; Auto on the same files is refused;
* in the demo's system (real API server, controller, embedded Job runner)
  the same Models reach Ready with ``status.resolved.format: Raw``, and the
  workloads are admitted and mutated (TorchServe's SharedPVC by the digest).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml

from api import names as contract
from cli.local.system import LocalSystem
from controller.upload.gateway import Gateway, create_server
from ingest.publish import Options, PublishError, publish
from ingest.sources import open_source
from jobs import upload_client
from kube import client as kube
from modelpack.oci.registry import RegistryClient
from tests import kubeenv, layouts
from tests.integration import demoenv
from tests.servers.files import FileServer
from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]

WORKLOADS = os.path.join(kubeenv.REPO_ROOT, "examples", "workloads")
ROOT = contract.MOUNT_ROOT
DLLAMA, TRITON, TORCHSERVE = "distributed-llama.yaml", "triton.yaml", "torchserve.yaml"
NS = "examples"
ADMIN = "admin-test-token"


def example(file: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the Model, the other objects) of one workload example."""
    with open(os.path.join(WORKLOADS, file)) as f:
        objs = [d for d in yaml.safe_load_all(f) if d]
    models = [d for d in objs if d["kind"] == "Model"]
    assert len(models) == 1, file
    return models[0], [d for d in objs if d["kind"] != "Model"]


def container(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for d in objs:
        if d["metadata"]["name"] == name:
            return d["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]
    raise AssertionError(name)


def flag(argv: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in ``argv``."""
    for i, a in enumerate(argv):
        if a.startswith(f"{name}="):
            return a.split("=", 1)[1]
        if a == name:
            return argv[i + 1]
    raise AssertionError(f"{name} not in {argv}")


def dllama_files() -> tuple[str, str]:
    """The model and tokenizer paths the root's command reads, relative to the mount."""
    model, objs = example(DLLAMA)
    argv = container(objs, "dllama-root")["command"]
    base = f"{ROOT}/{model['metadata']['name']}/"
    paths = flag(argv, "--model"), flag(argv, "--tokenizer")
    assert all(p.startswith(base) for p in paths), paths
    return paths[0][len(base):], paths[1][len(base):]


# --- the checkers refuse what the servers refuse ---

def test_triton_checker_accepts_the_generated_model_and_refuses_each_broken_rule(
        tmp_path: Any) -> None:
    repo = str(tmp_path)
    layouts.make_triton_model(os.path.join(repo, "m"), "m")
    assert layouts.check_triton_model(repo, "m") == ["1"]

    def broken(edit: Any, message: str) -> None:
        name = f"b{len(os.listdir(repo))}"
        layouts.make_triton_model(os.path.join(repo, name), name)
        edit(os.path.join(repo, name))
        with pytest.raises(layouts.LayoutError, match=message):
            layouts.check_triton_model(repo, name)

    def config(text: str) -> Any:
        return lambda d: open(os.path.join(d, "config.pbtxt"), "w").write(text)

    broken(lambda d: os.remove(os.path.join(d, "config.pbtxt")), "no config.pbtxt")
    broken(config('name: "other"\nplatform: "onnxruntime_onnx"\n'), "not its directory")
    broken(config("max_batch_size: 8\n"), "neither platform nor backend")
    broken(config('backend: "nosuch"\n'), "unknown platform/backend")
    broken(lambda d: os.rename(os.path.join(d, "1"), os.path.join(d, "01")),
           "no numeric version")
    broken(lambda d: os.rename(os.path.join(d, "1"), os.path.join(d, "v1")),
           "no numeric version")
    broken(lambda d: os.rename(os.path.join(d, "1", "model.onnx"),
                               os.path.join(d, "1", "model.plan")), "no model.onnx")
    broken(config('backend: "python"\n'), "no model.py")
    # a named file replaces the backend's default name
    broken(config('platform: "onnxruntime_onnx"\ndefault_model_filename: "enc.onnx"\n'),
           "no enc.onnx")


def test_torchserve_checker_accepts_the_generated_store_and_refuses_each_broken_rule(
        tmp_path: Any) -> None:
    good = tmp_path / "good"
    good.mkdir()
    layouts.make_mar(str(good / "mnist.mar"), "mnist")
    assert layouts.check_torchserve_store(str(good)) == ["mnist"]
    model = {"modelName": "mnist", "serializedFile": "model.pt",
             "handler": "image_classifier", "modelVersion": "1.0"}
    cases: list[tuple[Any, str]] = [
        ({"runtime": "python", "model": {**model, "handler": "handler.py"}},
         "neither a default handler"),
        ({"runtime": "python", "model": {**model, "serializedFile": "weights.pt"}},
         "serializedFile 'weights.pt' is not in the archive"),
        ({"runtime": "python", "model": {k: v for k, v in model.items()
                                         if k != "modelVersion"}}, "modelVersion is not set"),
        ({"runtime": "python", "model": {**model, "modelName": "other"}}, "not the file's"),
        ({"model": model}, "runtime python"),
    ]
    for i, (manifest, message) in enumerate(cases):
        store = tmp_path / f"s{i}"
        store.mkdir()
        layouts.make_mar(str(store / "mnist.mar"), "mnist", manifest)
        with pytest.raises(layouts.LayoutError, match=message):
            layouts.check_torchserve_store(str(store))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "mnist.pt").write_bytes(b"x")
    with pytest.raises(layouts.LayoutError, match="no .mar"):
        layouts.check_torchserve_store(str(empty))
    (empty / "mnist.mar").write_bytes(b"not a zip")
    with pytest.raises(layouts.LayoutError, match="not a zip"):
        layouts.check_torchserve_store(str(empty))
    nomanifest = tmp_path / "nomanifest"
    nomanifest.mkdir()
    with zipfile.ZipFile(nomanifest / "mnist.mar", "w") as zf:
        zf.writestr("model.pt", b"x")
    with pytest.raises(layouts.LayoutError, match="no MAR-INF/MANIFEST.json"):
        layouts.check_torchserve_store(str(nomanifest))


# --- the workloads read where their Models are mounted ---

def test_every_runtime_example_declares_raw_and_reads_its_mount() -> None:
    for file in (DLLAMA, TRITON, TORCHSERVE):
        model, objs = example(file)
        assert model["spec"]["format"] == "Raw", file
        name = model["metadata"]["name"]
        runtimes = [d for d in objs if name in (d["metadata"].get("annotations") or {})
                    .get("modelcache.io/models", "").split(",")]
        assert len(runtimes) == 1, file
    triton = container(example(TRITON)[1], "triton")["args"]
    name = example(TRITON)[0]["metadata"]["name"]
    # every mounted model is a directory of the repository; Triton's name is the Model's
    assert flag(triton, "--model-repository") == ROOT
    assert flag(triton, "--model-control-mode") == "explicit"
    assert flag(triton, "--load-model") == name
    torchserve = container(example(TORCHSERVE)[1], "torchserve")["args"]
    assert flag(torchserve, "--model-store") == f"{ROOT}/{example(TORCHSERVE)[0]['metadata']['name']}"
    assert flag(torchserve, "--models") == "all"
    weights, tokenizer = dllama_files()
    assert weights.endswith(".m") and tokenizer.endswith(".t")
    assert "/" not in weights + tokenizer


# --- each example Model published by the real worker, pulled back, checked ---

def _tar(tree: str, out: str) -> None:
    with tarfile.open(out, "w") as tf:
        for name in sorted(os.listdir(tree)):
            tf.add(os.path.join(tree, name), arcname=f"./{name}")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_served(www: str, work: str) -> dict[str, tuple[dict[str, Any], str]]:
    """Each example's tree generated and put where the example's URL basename says,
    under ``www``: file -> (the Model with its URL basename kept, the local tree)."""
    out = {}
    for file in (DLLAMA, TRITON, TORCHSERVE):
        model, _ = example(file)
        name, http = model["metadata"]["name"], model["spec"]["source"]["http"]
        served = os.path.join(www, http["url"].rsplit("/", 1)[1])
        tree = os.path.join(work, name)
        os.makedirs(tree)
        if file == DLLAMA:
            layouts.make_dllama(tree, *dllama_files())
        elif file == TRITON:
            layouts.make_triton_model(tree, name)
        else:
            basename = os.path.basename(served)
            layouts.make_mar(os.path.join(tree, basename), basename[:-len(".mar")])
        if http.get("archive") == "Tar":
            _tar(tree, served)
        else:
            (only,) = os.listdir(tree)
            os.link(os.path.join(tree, only), served)
        out[file] = model, tree
    return out


def check_delivered(file: str, model: dict[str, Any], dest_repo: str) -> None:
    """What each server would see at its mount, by its own rules."""
    name = model["metadata"]["name"]
    if file == TRITON:
        assert layouts.check_triton_model(dest_repo, name) == ["1"]
    elif file == TORCHSERVE:
        assert layouts.check_torchserve_store(os.path.join(dest_repo, name)) == ["mnist"]
    else:
        assert sorted(os.listdir(os.path.join(dest_repo, name))) == sorted(dllama_files())


@pytest.fixture
def served(tmp_path: Any) -> Iterator[tuple[FileServer, dict[str, tuple[dict[str, Any], str]]]]:
    www = tmp_path / "www"
    www.mkdir()
    trees = build_served(str(www), str(tmp_path / "trees"))
    with FileServer(str(www)) as fs:
        yield fs, trees


def test_examples_publish_raw_and_pull_back_as_their_servers_load(
        served: Any, client: Any, registry: Any, work_dir: str, tmp_path: Any) -> None:
    fs, trees = served
    for file, (model, tree) in trees.items():
        http = model["spec"]["source"]["http"]
        url = f"{fs.url}/{http['url'].rsplit('/', 1)[1]}"
        name = model["metadata"]["name"]
        opts = Options(expected_format=model["spec"]["format"], backoff=0.01)
        res = publish(open_source(url, archive=http["archive"]), client,
                      f"{registry.host}/examples/{name}:v1", work_dir=work_dir, options=opts)
        assert res.resolved["format"] == "Raw", file
        assert not res.resolved["tensors"] and res.resolved["files"] >= 1, res.resolved
        repo = str(tmp_path / "repo" / file)
        pull_back(client, res.reference, os.path.join(repo, name))  # digest-verified
        same_tree(tree, os.path.join(repo, name))
        check_delivered(file, model, repo)
        # never guessed: the same files without the declaration are refused
        with pytest.raises(PublishError) as e:
            publish(open_source(url, archive=http["archive"]), client,
                    f"{registry.host}/examples/{name}:auto", work_dir=work_dir,
                    options=Options(backoff=0.01))
        assert e.value.reason == "NoWeights" and not e.value.retryable, file


def test_raw_keeps_the_archive_rules(tmp_path: Any, client: Any, registry: Any,
                                     work_dir: str) -> None:
    """Declared Raw, a hostile tar is still refused before anything is published."""
    www = tmp_path / "www"
    www.mkdir()
    for name, entry in (("climb.tar", "../escape.m"), ("abs.tar", "/etc/escape.m")):
        with tarfile.open(www / name, "w") as tf:
            info = tarfile.TarInfo(entry)
            info.size = 4
            tf.addfile(info, io.BytesIO(b"data"))
    with tarfile.open(www / "link.tar", "w") as tf:
        info = tarfile.TarInfo("model.m")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with FileServer(str(www)) as fs:
        for name, reason in (("climb.tar", "UnsafePath"), ("abs.tar", "UnsafePath"),
                             ("link.tar", "LinkInArchive")):
            with pytest.raises(PublishError) as e:
                publish(open_source(f"{fs.url}/{name}", archive="Tar"), client,
                        f"{registry.host}/examples/hostile:v1", work_dir=work_dir,
                        options=Options(expected_format="Raw", backoff=0.01))
            assert not e.value.retryable, name
            assert e.value.reason == reason, (name, str(e.value))
    assert client.list_tags("examples/hostile") == []


# --- the upload gateway verifies the Model's declared format too ---

@pytest.fixture
def gateway(tmp_path: Any) -> Iterator[Gateway]:
    gw = Gateway(str(tmp_path / "gw"), admin_token=ADMIN,
                 client_factory=lambda host: RegistryClient(host, insecure=True),
                 options=Options(backoff=0.01))
    server = create_server(("127.0.0.1", 0), gw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield gw
    server.shutdown()
    server.server_close()


def test_upload_gateway_publishes_with_the_declared_format(
        gateway: Gateway, registry: Any, client: Any, tmp_path: Any) -> None:
    tree = tmp_path / "dllama"
    tree.mkdir()
    layouts.make_dllama(str(tree), *dllama_files())

    def session(name: str, **kw: str) -> requests.Response:
        return requests.post(f"{gateway.public_url}/v1/sessions",
                             headers={"Authorization": f"Bearer {ADMIN}"},
                             json={"model": f"{NS}/{name}", **kw,
                                   "reference": f"{registry.host}/models/{NS}/{name}:v1"},
                             timeout=10)

    s = session("declared", format="Raw").json()
    status = upload_client.upload(s["url"], s["token"], str(tree))
    assert status["result"]["resolved"]["format"] == "Raw"
    pull_back(client, status["result"]["reference"], str(tmp_path / "out"))
    same_tree(str(tree), str(tmp_path / "out"))
    for name, fmt in (("undeclared", "Auto"), ("mismatched", "Safetensors")):
        s = session(name, format=fmt).json()
        with pytest.raises(upload_client.UploadError) as e:
            upload_client.upload(s["url"], s["token"], str(tree))
        assert e.value.reason == "NoWeights", (fmt, e.value)
    assert session("lowercase", format="raw").status_code == 400


# --- in the demo's system: applied, Ready, admitted ---

@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, minilm_dir: str) -> Iterator[LocalSystem]:
    with demoenv.running(str(tmp_path_factory.mktemp("layouts") / "demo"), NS,
                         minilm_dir) as s:
        yield s


def _status(s: LocalSystem, name: str) -> dict[str, Any]:
    status: dict[str, Any] = s.client.get(kube.MODELS, name, NS).get("status") or {}
    return status


def test_examples_reach_ready_in_the_demo_and_their_workloads_are_admitted(
        system: LocalSystem, served: Any) -> None:
    fs, trees = served
    for model, _ in trees.values():
        local = copy.deepcopy(model)
        http = local["spec"]["source"]["http"]
        basename = http["url"].rsplit("/", 1)[1]
        # plain http on loopback, so pinned by its sha256 as the API requires
        http["url"], http["sha256"] = f"{fs.url}/{basename}", _sha256(
            os.path.join(fs.root, basename))
        demoenv.kubectl(system, "apply", "-n", NS, "-f", "-", input=yaml.safe_dump(local))
    digests = {}
    for file, (model, _) in trees.items():
        name = model["metadata"]["name"]

        def ready(name: str = name) -> bool:
            st = _status(system, name)
            assert st.get("phase") != "Failed", (name, st)
            return st.get("phase") == "Ready"
        demoenv.wait_for(f"{name} Ready", ready, 120)
        st = _status(system, name)
        assert st["resolved"]["format"] == "Raw", st
        assert st["artifact"]["digest"].startswith("sha256:")
        digests[file] = st["artifact"]["digest"]
    # declared once: the format cannot be switched back to detection
    res = demoenv.kubectl(system, "patch", "model", "-n", NS, name, "--type=merge",
                          "-p", '{"spec": {"format": "Auto"}}', check=False)
    assert res.returncode != 0 and "spec.format is immutable" in res.stderr, res.stderr

    for file in (DLLAMA, TRITON, TORCHSERVE):
        _, objs = example(file)
        demoenv.kubectl(system, "apply", "-n", NS, "-f", "-",
                        input=yaml.safe_dump_all(objs))
        for d in objs:
            ann = d["metadata"].get("annotations") or {}
            if "modelcache.io/models" not in ann:
                continue
            stored = json.loads(demoenv.kubectl(system, "get", "-n", NS, d["kind"],
                                                d["metadata"]["name"], "-o", "json").stdout)
            spec = stored["spec"]["template"]["spec"]
            name = ann["modelcache.io/models"]
            assert {"name": contract.GATE} in spec["schedulingGates"], file
            assert f"{ROOT}/{name}" in {m["mountPath"]
                                        for m in spec["containers"][0]["volumeMounts"]}
            if ann.get("modelcache.io/delivery") == "SharedPVC":
                claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                          if "persistentVolumeClaim" in v]
                assert claims == [f"modelcache-{digests[file].split(':')[1][:40]}"], claims
