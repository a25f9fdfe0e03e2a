"""S3 source against a real S3-compatible server (versitygw on loopback)."""

from __future__ import annotations

import os

import pytest

from ingest.publish import PublishError, publish
from ingest.sources import base, open_source
from tests import modelgen
from tests.servers import s3 as s3server
from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]



def _creds(server: s3server.S3Server) -> dict[str, str]:
    return {"endpoint": server.endpoint, "region": "us-east-1",
            "access_key": s3server.ACCESS_KEY, "secret_key": s3server.SECRET_KEY}


def _upload(client, bucket: str, prefix: str, root: str) -> None:
    for dirpath, _, names in os.walk(root):
        for n in names:
            full = os.path.join(dirpath, n)
            key = prefix + os.path.relpath(full, root).replace(os.sep, "/")
            client.upload_file(full, bucket, key)


def test_s3_prefix_publishes_and_pulls_back(s3, client, registry, work_dir, tmp_path):
    s3c = s3.client()
    s3c.create_bucket(Bucket="models")
    model = str(tmp_path / "diff")
    modelgen.make_diffusers_model(model)
    _upload(s3c, "models", "sd/tiny/", model)
    s3c.put_object(Bucket="models", Key="other/unrelated.txt", Body=b"not ours")
    src = open_source("s3://models/sd/tiny", **_creds(s3))
    res = publish(src, client, f"{registry.host}/models/s3-diffusers:v1", work_dir=work_dir)
    assert res.resolved["format"] == "Diffusers"
    assert res.revision.startswith("sha256:")
    dest = str(tmp_path / "out")
    pull_back(client, res.reference, dest)
    same_tree(model, dest)
    # the listing pins the revision: the same objects resolve to the same revision
    again = open_source("s3://models/sd/tiny/", **_creds(s3)).resolve()
    assert again.revision == res.revision
    s3c.put_object(Bucket="models", Key="sd/tiny/README.md", Body=b"# changed\n")
    assert open_source("s3://models/sd/tiny/", **_creds(s3)).resolve().revision != res.revision


def test_s3_md5_etag_is_checked(s3, client, registry, work_dir, tmp_path, small_model):
    s3c = s3.client()
    s3c.create_bucket(Bucket="etags")
    _upload(s3c, "etags", "m/", small_model)
    src = open_source("s3://etags/m/", **_creds(s3))
    r = src.resolve()
    assert all(f.check and f.check[0] == "md5" for f in r.files)
    # a source whose stated MD5 disagrees with the bytes is refused
    bad = tuple(base.SourceFile(f.path, f.size, None, ("md5", "0" * 32), version=f.version)
                if f.path == "config.json" else f for f in r.files)

    class Lying:
        uri = src.uri

        def resolve(self):
            return base.Resolved(r.revision, bad, {})

        def open(self, f, offset=0):
            return src.open(f, offset)

        def close(self):
            pass

    with pytest.raises(PublishError) as e:
        publish(Lying(), client, f"{registry.host}/models/s3-bad:v1", work_dir=work_dir)
    assert e.value.reason == "ChecksumMismatch"
    assert client.list_tags("models/s3-bad") == []


def test_s3_errors(s3):
    creds = _creds(s3)
    with pytest.raises(base.SourceNotFound):
        open_source("s3://no-such-bucket/x", **creds).resolve()
    s3.client().create_bucket(Bucket="empty")
    with pytest.raises(base.SourceNotFound):
        open_source("s3://empty/nothing/", **creds).resolve()
    with pytest.raises(base.SourceAuthError):
        open_source("s3://empty/x", **{**creds, "secret_key": "wrong"}).resolve()
