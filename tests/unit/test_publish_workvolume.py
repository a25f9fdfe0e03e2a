"""The publish Job's work directory: an emptyDir by default, a PVC per Job with
``--publish-work-size``; and staging's rule for resuming a kept ``.part``.

Pure: the Job and claim bodies (controller/models/publishjob.py), the flags
(controller/main.py) and ``stage_file`` against an in-memory source. The
resume across real pods is tests/integration/test_publish_resume.py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Any

import pytest

from controller import main
from controller.models import publishjob as jobs
from ingest.publish.stage import part_key, stage_file
from ingest.sources import base
from modelpack.store.blobs import BlobStore

MODEL: dict[str, Any] = {
    "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
    "metadata": {"name": "m", "namespace": "team", "uid": "u-1", "generation": 1},
    "spec": {"source": {"http": {"url": "https://example.com/m.gguf"}}}}


def _settings(**kw: Any) -> jobs.Settings:
    return jobs.Settings(namespace="modelcache-system", registry="dmcr:5000", **kw)


def _pod(settings: jobs.Settings) -> dict[str, Any]:
    p = jobs.plan(MODEL, settings)
    return jobs.build(MODEL, p, "k1", settings)["spec"]["template"]["spec"]


def test_default_is_an_emptydir_as_before() -> None:
    pod = _pod(_settings())
    assert pod["volumes"][0] == {"name": "work", "emptyDir": {}}
    # besides it, only the Job's Secret (test_job_secrets.py), read by the worker's group
    assert [v["name"] for v in pod["volumes"]] == ["work", "secrets"]
    assert pod["securityContext"] == {"fsGroup": 65532, "fsGroupChangePolicy": "OnRootMismatch"}


def test_work_volume_is_a_claim_per_job_writable_by_the_worker() -> None:
    settings = _settings(work_volume=jobs.WorkVolume("500Gi", "fast"))
    pod = _pod(settings)
    name = jobs.job_name(MODEL, "k1")
    assert pod["volumes"][0] == {"name": "work", "persistentVolumeClaim": {
        "claimName": f"{name}-work"}}
    assert pod["containers"][0]["volumeMounts"][0] == {"name": "work", "mountPath": jobs.WORK_DIR}
    # a fresh volume's root is root's: the worker (65532) gets it by group, chowned once
    assert pod["securityContext"] == {"fsGroup": 65532, "fsGroupChangePolicy": "OnRootMismatch"}
    job = {"metadata": {"name": name, "uid": "job-uid"}}
    claim = jobs.work_claim(MODEL, job, "k1", settings)
    assert claim["metadata"]["name"] == f"{name}-work"
    assert claim["metadata"]["namespace"] == "modelcache-system"
    assert claim["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": "job-uid"}]
    assert claim["metadata"]["labels"]["modelcache.io/uid"] == "u-1"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                             "resources": {"requests": {"storage": "500Gi"}}}
    default_class = jobs.work_claim(MODEL, job, "k1", _settings(
        work_volume=jobs.WorkVolume("1Ti")))
    assert "storageClassName" not in default_class["spec"]


def _manager_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    main._manager_parser(sub)
    return parser.parse_args(["manager", "--registry", "r:5000", *argv])


def test_flags() -> None:
    assert main._work_volume(_manager_args()) is None
    wv = main._work_volume(_manager_args("--publish-work-size", "200Gi",
                                         "--publish-work-storage-class", "ssd"))
    assert wv == jobs.WorkVolume("200Gi", "ssd")
    assert main._work_volume(_manager_args("--publish-work-size", "1Ti")) == jobs.WorkVolume(
        "1Ti", None)
    with pytest.raises(SystemExit):
        main._work_volume(_manager_args("--publish-work-size", "lots"))


class _Source:
    """Serves ``data`` honouring Range; counts the bytes it hands out."""

    uri = "https://example.com/m.bin"

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sent = 0
        self.opens: list[int] = []

    def open(self, file: base.SourceFile, offset: int = 0) -> Any:
        self.opens.append(offset)
        src = self

        class _S:
            def __init__(self) -> None:
                self.offset = self.pos = offset

            def readinto(self, buf: memoryview) -> int:
                n = min(len(buf), len(src.data) - self.pos)
                buf[:n] = src.data[self.pos:self.pos + n]
                self.pos += n
                src.sent += n
                return n

            def close(self) -> None:
                pass
        return _S()


@pytest.mark.parametrize("revision,version,resumed", [
    ("etag-1", "", True),     # pinned by the revision (an ETag, a commit, a listing)
    ("", '"v1"', True),       # pinned by the file's validator
    ("", "", False),          # a URL that states nothing: it may have changed since
])
def test_kept_part_is_resumed_only_when_its_key_pins_the_content(
        tmp_path: Any, revision: str, version: str, resumed: bool) -> None:
    data = os.urandom(3 << 20)
    store = BlobStore(str(tmp_path / "s"))
    f = base.SourceFile("m.bin", len(data), version=version)
    # the killed pod's .part: the first 60 %, at the key the next pod will look for
    cut = len(data) * 6 // 10
    with open(os.path.join(store.ingest_dir, part_key(_Source.uri, revision, f) + ".part"),
              "wb") as fp:
        fp.write(data[:cut])
    src = _Source(data)
    digest = stage_file(src, revision, f, store, lambda n: None, sleep=lambda _: None)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert src.opens == ([cut] if resumed else [0])
    assert src.sent == len(data) - (cut if resumed else 0)
