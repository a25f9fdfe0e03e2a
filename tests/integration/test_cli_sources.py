"""``modelcache pack SOURCE`` for remote sources, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess

from tests import modelgen
from tests.servers.helpers import same_tree

pytest_plugins = ["tests.servers.fixtures"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["modelcache", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_pack_hf_uri_push_then_pull(hub, registry, minilm_dir, tmp_path):
    hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_dir)
    ref = f"{registry.host}/cli/minilm-hf:v1"
    p = run("pack", "hf://sentence-transformers/all-MiniLM-L6-v2", "--push", ref,
            env={"HF_ENDPOINT": hub.url})
    assert p.returncode == 0, p.stderr
    digest = p.stdout.split("digest: ")[1].split()[0]
    dest = str(tmp_path / "pulled")
    p = run("pull", ref, dest)
    assert p.returncode == 0 and digest in p.stdout
    same_tree(minilm_dir, dest)
    meta = json.loads(run("inspect", ref, "--json").stdout)
    assert meta["family"] == "bert" and meta["parameterCount"] == 22713728


def test_pack_hf_uri_to_layout_with_include(hub, tmp_path):
    src = str(tmp_path / "gguf")
    modelgen.make_gguf_model(src)
    with open(os.path.join(src, "notes.txt"), "w") as f:
        f.write("not wanted")
    hub.add_repo("org/tiny-gguf", src)
    out = str(tmp_path / "oci")
    p = run("pack", "hf://org/tiny-gguf", "--output", out, "--include", "*.gguf",
            env={"HF_ENDPOINT": hub.url})
    assert p.returncode == 0, p.stderr
    meta = json.loads(run("inspect", out, "--json").stdout)
    assert meta["format"] == "GGUF" and [x["path"] for x in meta["layers"]] == ["model.gguf"]


def test_unknown_hf_repo_is_one_clear_line(hub, registry):
    p = run("pack", "hf://org/does-not-exist", "--push", f"{registry.host}/cli/nope:v1",
            env={"HF_ENDPOINT": hub.url})
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "RepoNotFound" in p.stderr
