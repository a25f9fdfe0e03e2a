"""Hugging Face source → publish worker → real registry → pull back, byte for byte.

The server is ``tests/servers/hfhub.py`` (what ``huggingface_hub`` 2.x
calls, with CDN redirects, Range and typed errors); the registry is the
real docker-registry. Hostile knobs: dropped connections, lying sizes,
corrupt bytes, hostile names, gated and private repos.
"""

from __future__ import annotations

import os

import pytest

from ingest.publish import Options, PublishError, publish
from ingest.sources import base, open_source
from ingest.sources.huggingface import HuggingFaceSource
from modelpack.oci.registry import RegistryClient
from tests import modelgen
from tests.servers.helpers import pull_back, same_tree
from tests.servers.hfhub import HubServer

pytest_plugins = ["tests.servers.fixtures"]

FAST = Options(backoff=0.01)


def _publish(hub: HubServer, client: RegistryClient, repo: str, tag: str, work_dir: str,
             options: Options = FAST, **kw: object):
    src = open_source(f"hf://{repo}", endpoint=hub.url, **kw)
    try:
        return publish(src, client, f"{client.host}/models/{tag}", work_dir=work_dir,
                       options=options)
    finally:
        src.close()


def test_minilm_publishes_and_pulls_back_identical(hub, client, registry, minilm_dir,
                                                   work_dir, tmp_path):
    repo = hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_dir)
    hub.knobs.page_size = 4  # the tree listing paginates with Link headers
    events: list[dict] = []
    src = open_source("hf://sentence-transformers/all-MiniLM-L6-v2@main", endpoint=hub.url)
    res = publish(src, client, f"{registry.host}/models/minilm:v1", work_dir=work_dir,
                  sink=events.append)
    assert res.revision == repo.sha
    assert res.resolved["format"] == "Safetensors"
    assert res.resolved["family"] == "bert"
    assert res.resolved["architecture"] == "BertModel"
    assert res.resolved["parameterCount"] == 22713728
    assert res.resolved["files"] == 13
    assert events[-1]["phase"] == "done" and events[-1]["percent"] == 100.0
    assert events[-1]["bytesDone"] == events[-1]["bytesTotal"] == res.size
    assert all(e["percent"] <= 99.0 for e in events[:-1])
    dest = str(tmp_path / "pulled")
    pack = pull_back(client, res.reference, dest)
    assert pack.digest == res.digest
    same_tree(minilm_dir, dest)
    assert not os.listdir(work_dir)  # staging removed after success


def test_generated_gguf_and_diffusers_and_hf_endpoint_env(hub, client, registry, work_dir,
                                                          tmp_path, monkeypatch):
    g = str(tmp_path / "g")
    modelgen.make_gguf_model(g)
    d = str(tmp_path / "d")
    modelgen.make_diffusers_model(d)
    hub.add_repo("acme/tiny-gguf", g)
    hub.add_repo("acme/tiny-diffusers", d)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # no endpoint argument: the env var decides
    for repo, root, fmt in (("acme/tiny-gguf", g, "GGUF"), ("acme/tiny-diffusers", d, "Diffusers")):
        src = open_source(f"hf://{repo}")
        assert isinstance(src, HuggingFaceSource) and src.endpoint == hub.url
        res = publish(src, client, f"{registry.host}/models/{repo.split('/')[1]}:v1",
                      work_dir=work_dir, options=FAST)
        assert res.resolved["format"] == fmt
        dest = str(tmp_path / f"out-{fmt}")
        pull_back(client, res.reference, dest)
        same_tree(root, dest)


def test_include_exclude_and_revision_pin(hub, client, registry, work_dir, small_model):
    repo = hub.add_repo("acme/small", small_model, refs={"v1.0": "0" * 40})
    repo.refs["v1.0"] = repo.sha
    res = _publish(hub, client, "acme/small@v1.0", "small-inc:v1", work_dir,
                   include=["*.safetensors", "*.json"], exclude=["tokenizer.json"])
    assert res.revision == repo.sha
    assert res.resolved["files"] == 2  # model.safetensors + config.json
    res2 = _publish(hub, client, f"acme/small@{repo.sha}", "small-inc:v2", work_dir,
                    include=["*.safetensors", "*.json"], exclude=["tokenizer.json"])
    assert res2.digest == res.digest  # same files, same identity


def test_dropped_connection_resumes_within_a_run(hub, client, registry, work_dir, small_model,
                                                 tmp_path):
    hub.add_repo("acme/drop", small_model)
    size = os.path.getsize(os.path.join(small_model, "model.safetensors"))
    hub.knobs.drop_after["model.safetensors"] = size // 2
    hub.knobs.drops_left["model.safetensors"] = 1
    res = _publish(hub, client, "acme/drop", "drop:v1", work_dir)
    ranged = [r for m, p, r in hub.requests if p.startswith("/cdn/") and p.endswith("model.safetensors") and r]
    assert ranged == [f"bytes={size // 2}-"]  # resumed where it broke, not from 0
    dest = str(tmp_path / "out")
    pull_back(client, res.reference, dest)
    same_tree(small_model, dest)


def test_interrupted_run_resumes_on_restart_and_never_publishes_truncated(
        hub, client, registry, work_dir, small_model, tmp_path):
    hub.add_repo("acme/restart", small_model)
    size = os.path.getsize(os.path.join(small_model, "model.safetensors"))
    hub.knobs.drop_after["model.safetensors"] = size // 3
    hub.knobs.drops_left["model.safetensors"] = 1000  # the source keeps breaking there
    with pytest.raises(PublishError) as e:
        _publish(hub, client, "acme/restart", "restart:v1", work_dir)
    assert e.value.retryable and e.value.reason == "SourceUnavailable"
    assert client.list_tags("models/restart") == []
    parts = [os.path.join(dp, n) for dp, _, ns in os.walk(work_dir) for n in ns
             if n.endswith(".part")]
    assert [os.path.getsize(p) for p in parts] == [size // 3]  # kept for the next attempt
    hub.knobs.drops_left.clear()
    hub.requests.clear()
    res = _publish(hub, client, "acme/restart", "restart:v1", work_dir)
    ranged = [r for m, p, r in hub.requests if p.startswith("/cdn/") and p.endswith("model.safetensors") and m == "GET"]
    assert ranged == [f"bytes={size // 3}-"]
    dest = str(tmp_path / "out")
    pull_back(client, res.reference, dest)
    same_tree(small_model, dest)


@pytest.mark.parametrize("path", ["model.safetensors", "config.json"])
def test_checksum_mismatch_fails_and_leaves_no_tag(hub, client, registry, work_dir,
                                                   small_model, path):
    hub.add_repo("acme/corrupt", small_model)
    hub.knobs.corrupt.add(path)
    with pytest.raises(PublishError) as e:
        _publish(hub, client, "acme/corrupt", "corrupt:v1", work_dir)
    assert e.value.reason == "ChecksumMismatch" and not e.value.retryable
    assert path in str(e.value)
    assert client.list_tags("models/corrupt") == []
    assert not os.path.exists(work_dir) or not os.listdir(work_dir)


@pytest.mark.parametrize("delta", [+1000, -1000])
def test_source_lying_about_size_is_refused(hub, client, registry, work_dir, small_model,
                                            delta):
    hub.add_repo("acme/liar", small_model)
    real = os.path.getsize(os.path.join(small_model, "model.safetensors"))
    hub.knobs.size_lie["model.safetensors"] = real + delta
    with pytest.raises(PublishError) as e:
        _publish(hub, client, "acme/liar", "liar:v1", work_dir)
    assert e.value.reason == "SizeMismatch", e.value
    assert client.list_tags("models/liar") == []


@pytest.mark.parametrize("name", ["../../etc/evil.json", "/etc/passwd", "a/../../b.json",
                                  "ok/./x.json"])
def test_hostile_file_names_refused(hub, client, registry, work_dir, small_model, name):
    hub.add_repo("acme/hostile", small_model)
    hub.knobs.hostile_names.append(name)
    with pytest.raises(PublishError) as e:
        _publish(hub, client, "acme/hostile", "hostile:v1", work_dir)
    assert e.value.reason == "UnsafePath" and not e.value.retryable
    assert client.list_tags("models/hostile") == []


def test_typed_hub_errors(hub, small_model):
    hub.add_repo("acme/gated", small_model, gated=True)
    hub.add_repo("acme/private", small_model, private=True)
    cases = [
        ("acme/missing", None, base.SourceNotFound, "RepoNotFound"),
        ("acme/gated@main", None, base.SourceAuthError, "GatedRepo"),
        ("acme/private", None, base.SourceNotFound, "RepoNotFound"),
    ]
    hub.add_repo("acme/present", small_model)
    cases.append(("acme/present@no-such-branch", None, base.SourceNotFound, "RevisionNotFound"))
    for uri, token, cls, reason in cases:
        src = HuggingFaceSource(uri.split("@")[0], uri.partition("@")[2] or "main",
                                endpoint=hub.url, token=token)
        with pytest.raises(cls) as e:
            src.resolve()
        assert e.value.reason == reason, (uri, e.value)
        assert not e.value.retryable
    # with the token, gated and private repos resolve
    for repo in ("acme/gated", "acme/private"):
        r = HuggingFaceSource(repo, endpoint=hub.url, token="hf_test_token").resolve()
        assert {f.path for f in r.files} >= {"model.safetensors", "config.json"}
    with pytest.raises(base.InvalidSourceError):
        open_source("hf://../etc", endpoint=hub.url)


def test_real_snapshot_download_agrees_with_the_test_server(hub, minilm_dir, tmp_path):
    """The server is what huggingface_hub expects: its own client downloads the repo."""
    from huggingface_hub import snapshot_download

    hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_dir)
    hub.knobs.page_size = 5
    path = snapshot_download("sentence-transformers/all-MiniLM-L6-v2",
                             cache_dir=str(tmp_path / "cache"), endpoint=hub.url)
    same_tree(minilm_dir, path)
