"""The SharedPVC materializer against a real registry, in-process and as the CLI.

A directory stands for the PVC. Acceptance: the tree appears at
``<dest>/<manifest hex>`` byte-identical to the model, read-only, with no
staging left; a re-run finds it intact without asking the registry; a
crashed attempt's staging dir is removed and its verified blobs reused (a
corrupt one is not); a damaged tree is replaced; a corrupt blob in the
registry is refused (exit 1, a clear reason) with nothing at the final path;
a volume held by another materializer is a retryable exit 75.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from api import names as contract
from jobs import materialize
from modelpack.oci.reference import parse
from modelpack.pack import pack_to_registry
from modelpack.pull import verify_tree
from tests import modelgen
from tests.servers.helpers import same_tree

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args: str, timeout: float = 60) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "controller.main", "materialize", *args],
                          cwd=REPO_ROOT, capture_output=True, timeout=timeout)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError as e:
        raise AssertionError(f"no result JSON: {proc.stdout!r} {proc.stderr[-2000:]!r}") from e


def pushed(registry, client, src: str, repo: str):
    return pack_to_registry(src, client, parse(f"{registry.host}/{repo}:v1"))


def leftovers(dest: str) -> list[str]:
    return sorted(n for n in os.listdir(dest)
                  if n.startswith((materialize.STAGING_PREFIX, materialize.BROKEN_PREFIX)))


def test_tree_is_verified_read_only_and_a_rerun_is_quick(registry, client, small_model,
                                                         tmp_path):
    res = pushed(registry, client, small_model, "mat/ok")
    digest = res.pack.digest
    dest = str(tmp_path / "pvc")
    out = materialize.materialize(client, parse(f"{registry.host}/mat/ok:v1"), dest)
    tree = os.path.join(dest, contract.pvc_subpath(digest))
    assert out.digest == digest and out.path == tree and not out.skipped
    assert out.files == len(res.pack.layers) and out.size == res.pack.size
    same_tree(small_model, tree)
    verify_tree(res.pack, tree)
    for dirpath, _, names in os.walk(tree):
        assert os.stat(dirpath).st_mode & 0o222 == 0, dirpath
        for n in names:
            assert os.stat(os.path.join(dirpath, n)).st_mode & 0o222 == 0, n
            assert os.stat(os.path.join(dirpath, n)).st_mode & 0o444 == 0o444, n
    assert leftovers(dest) == []

    # the re-run answers from the volume alone: a registry that is not there is not asked
    code, result = cli("--reference", f"127.0.0.1:1/mat/ok@{digest}", "--dest", dest,
                       "--digest", digest, "--insecure")
    assert code == 0, result
    assert result["skipped"] is True and result["digest"] == digest
    assert result["path"] == tree


def test_crash_leftovers_are_removed_and_verified_blobs_reused(registry, client, tmp_path):
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, seed=11)
    res = pushed(registry, client, src, "mat/crash")
    digest = res.pack.digest
    dest = str(tmp_path / "pvc")
    weight = next(x for x in res.pack.layers if x.path == "model.safetensors")
    config = next(x for x in res.pack.layers if x.path == "config.json")
    # what a SIGKILLed attempt leaves: a verified blob, a blob named for a digest it does
    # not have (a disk that lied), a half-written .part, a half-placed tree
    dead = os.path.join(dest, ".staging-dead01")
    blobs = os.path.join(dead, "store", "blobs", "sha256")
    os.makedirs(blobs)
    os.makedirs(os.path.join(dead, "store", "ingest"))
    os.makedirs(os.path.join(dead, ".tree.tmp-x"))
    shutil.copyfile(os.path.join(src, "model.safetensors"),
                    os.path.join(blobs, weight.digest.split(":")[1]))
    with open(os.path.join(blobs, config.digest.split(":")[1]), "wb") as f:
        f.write(b"{" + b" " * (config.size - 2) + b"}")
    with open(os.path.join(dead, "store", "ingest", "x.part"), "wb") as f:
        f.write(b"partial")
    out = materialize.materialize(client, parse(f"{registry.host}/mat/crash:v1"), dest,
                                  digest)
    assert out.salvaged == 1  # the weight; the lying config blob was fetched again
    same_tree(src, out.path)
    verify_tree(res.pack, out.path)
    assert leftovers(dest) == []


def test_damaged_tree_is_replaced(registry, client, small_model, tmp_path):
    res = pushed(registry, client, small_model, "mat/damaged")
    digest = res.pack.digest
    dest = str(tmp_path / "pvc")
    ref = parse(f"{registry.host}/mat/damaged:v1")
    first = materialize.materialize(client, ref, dest)
    victim = os.path.join(first.path, "model.safetensors")
    os.chmod(first.path, 0o755)
    os.unlink(victim)
    with open(victim, "wb") as f:
        f.write(b"cut")
    again = materialize.materialize(client, ref, dest, digest)
    assert not again.skipped
    same_tree(small_model, again.path)
    assert leftovers(dest) == []


def test_corrupt_blob_is_refused_with_nothing_visible(registry, client, tmp_path):
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, seed=13)
    res = pushed(registry, client, src, "mat/corrupt")
    digest = res.pack.digest
    weight = next(x for x in res.pack.layers if x.path == "model.safetensors")
    blob = registry.blob_path(weight.digest)
    data = bytearray(open(blob, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(blob, "wb") as f:
        f.write(data)
    dest = str(tmp_path / "pvc")
    code, result = cli("--reference", f"{registry.host}/mat/corrupt:v1", "--dest", dest,
                       "--digest", digest, "--insecure")
    assert code == 1, result
    assert result["error"]["reason"] == "DigestMismatch"
    assert result["error"]["retryable"] is False
    assert weight.digest in result["error"]["message"] or "hash" in result["error"]["message"]
    assert not os.path.exists(os.path.join(dest, contract.pvc_subpath(digest)))
    assert not os.path.exists(materialize.record_path(dest, digest))
    assert leftovers(dest) == []


def test_bad_input_is_terminal(registry, client, small_model, tmp_path):
    res = pushed(registry, client, small_model, "mat/bad")
    dest = str(tmp_path / "pvc")
    code, result = cli("--reference", "no-host-here", "--dest", dest)
    assert code == 1 and result["error"]["reason"] == "InvalidReference", result
    code, result = cli("--reference", f"{registry.host}/mat/bad:v1", "--dest", dest,
                       "--digest", "sha256:xyz", "--insecure")
    assert code == 1 and result["error"]["reason"] == "InvalidDigest", result
    other = "sha256:" + "0" * 64
    code, result = cli("--reference", f"{registry.host}/mat/bad@{res.pack.digest}",
                       "--dest", dest, "--digest", other, "--insecure")
    assert code == 1 and result["error"]["reason"] == "DigestMismatch", result
    # pinned to a manifest the repository does not have: the tag is not taken instead
    code, result = cli("--reference", f"{registry.host}/mat/bad:v1", "--dest", dest,
                       "--digest", other, "--insecure")
    assert code == 1 and result["error"]["reason"] == "NotFound", result
    assert os.listdir(dest) == [materialize.LOCK_NAME]


def test_a_held_volume_is_retryable(registry, client, small_model, tmp_path):
    res = pushed(registry, client, small_model, "mat/held")
    dest = str(tmp_path / "pvc")
    os.makedirs(dest)
    with materialize._Lock(dest, 1.0):  # POSIX locks are per process: the CLI is another
        code, result = cli("--reference", f"{registry.host}/mat/held:v1", "--dest", dest,
                           "--digest", res.pack.digest, "--insecure", "--lock-timeout", "0.5")
    assert code == 75, result
    assert result["error"]["reason"] == "Locked" and result["error"]["retryable"] is True
    code, result = cli("--reference", f"{registry.host}/mat/held:v1", "--dest", dest,
                       "--digest", res.pack.digest, "--insecure")
    assert code == 0 and result["skipped"] is False, result


@pytest.mark.parametrize("bad", ["", "sha256:", "md5:" + "0" * 32, "SHA256:" + "a" * 64])
def test_malformed_digest_is_refused_before_any_call(bad, registry, client, tmp_path):
    with pytest.raises(materialize.MaterializeError) as e:
        materialize.materialize(client, parse(f"{registry.host}/mat/x:v1"),
                                str(tmp_path / "pvc"), bad)
    assert e.value.reason == "InvalidDigest" and not e.value.retryable
