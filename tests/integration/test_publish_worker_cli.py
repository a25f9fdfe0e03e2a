"""``modelcache-controller publish`` as a process: progress JSON lines, result JSON, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # the sources here are loopback servers: the Job's address deny list is opted out
    return subprocess.run([sys.executable, "-m", "controller.main", "publish", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MODELCACHE_ALLOW_PRIVATE_SOURCES": "1",
                               **(env or {})}, cwd=os.getcwd())


def test_publish_process_reports_progress_and_result(hub, registry, client, small_model,
                                                     tmp_path):
    repo = hub.add_repo("acme/cli", small_model)
    progress = tmp_path / "progress.jsonl"
    p = _run("--source", "hf://acme/cli", "--to", f"{registry.host}/models/cli:v1",
             "--insecure-registry", "--work-dir", str(tmp_path / "w"),
             "--progress-file", str(progress), env={"HF_ENDPOINT": hub.url})
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["resolvedRevision"] == repo.sha
    assert result["resolved"]["format"] == "Safetensors"
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert {"bytesDone", "bytesTotal", "percent", "bytesPerSecond", "etaSeconds"} <= set(events[0])
    assert events[-1]["phase"] == "done" and events[-1]["percent"] == 100.0
    dest = str(tmp_path / "out")
    pull_back(client, result["reference"], dest)
    same_tree(small_model, dest)


def test_publish_process_terminal_and_retryable_failures(hub, registry, small_model, tmp_path):
    hub.add_repo("acme/bad", small_model)
    hub.knobs.corrupt.add("model.safetensors")
    p = _run("--source", "hf://acme/bad", "--to", f"{registry.host}/models/clibad:v1",
             "--insecure-registry", "--work-dir", str(tmp_path / "w"),
             env={"HF_ENDPOINT": hub.url})
    assert p.returncode == 1
    err = json.loads(p.stdout)["error"]
    assert err["reason"] == "ChecksumMismatch" and err["retryable"] is False
    p = _run("--source", "hf://acme/bad", "--to", f"{registry.host}/models/clibad:v1",
             "--insecure-registry", "--work-dir", str(tmp_path / "w"),
             env={"HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there
    assert p.returncode == 75, p.stdout
    assert json.loads(p.stdout)["error"]["retryable"] is True


def test_publish_uri_matches_core_pack_digest_for_registry_and_layout(registry, client,
                                                                      minilm_dir, tmp_path):
    """A model published from a source has the identity the core gives the same files."""
    from ingest.publish import publish_uri
    from modelpack.oci import layout as oci_layout
    from modelpack.oci.reference import parse
    from modelpack.pack import pack_to_registry

    core = pack_to_registry(minilm_dir, client, parse(f"{registry.host}/models/core-minilm:v1"))
    events: list[dict] = []
    res = publish_uri(minilm_dir, push=f"{registry.host}/models/src-minilm:v1", client=client,
                      work_dir=str(tmp_path / "w"), progress=events.append)
    assert res.digest == core.pack.digest
    assert events[-1]["phase"] == "done"
    out = str(tmp_path / "layout")
    lay = publish_uri(minilm_dir, output=out, work_dir=str(tmp_path / "w"))
    assert lay.digest == core.pack.digest
    pack, _ = oci_layout.read(out, "latest")
    assert pack.digest == core.pack.digest


def test_publish_to_a_registry_with_basic_auth(small_model, tmp_path):
    """The zero-copy push carries the same credentials the registry client uses."""
    from cli.local import registry as localregistry
    from ingest.publish import publish_uri
    from modelpack.oci.registry import RegistryClient

    with localregistry.running(username="pub", password="s3cret") as reg:
        client = RegistryClient(reg.host, insecure=True, username="pub", password="s3cret")
        res = publish_uri(small_model, push=f"{reg.host}/models/authed:v1", client=client,
                          work_dir=str(tmp_path / "w"))
        dest = str(tmp_path / "out")
        pull_back(client, res.reference, dest)
        same_tree(small_model, dest)
