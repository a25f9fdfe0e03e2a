"""S3 source: ``s3://BUCKET/PREFIX`` on AWS or any S3-compatible endpoint.

``resolve`` lists the prefix (paginated) and pins the listing: the
revision is the digest of every (key, ETag, size), so a changed object is
a new revision. Keys become paths relative to the prefix and are checked
like any other untrusted name. A single-part ETag is the object's MD5 and
is checked in the same pass as the download; a stated SHA-256 checksum is
used as the digest. Ranged GETs carry ``IfMatch`` so a resumed transfer
never splices two versions, and an answer is taken from the byte its
``Content-Range`` names (none: the whole object, from 0). Credentials come from arguments or the usual
AWS environment; botocore's errors map to ours here. ``latest`` is the
same listing and the same digest (``_listing``), without the per-object
HEADs ``resolve`` adds for stated checksums.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from ingest.sources import base, httpio, netpolicy
from modelpack.errors import UnsafePathError
from modelpack.paths import MAX_FILES, safe_relpath

_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')


def _map(e: Exception, what: str) -> base.SourceError:
    if (denied := netpolicy.denial(e)) is not None:  # botocore wraps the connect guard's
        return denied
    msg = f"{what}: {type(e).__name__}"
    if isinstance(e, botocore.exceptions.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        code = code if re.fullmatch(r"[A-Za-z0-9.]{1,64}", code) else ""
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        # the status and S3's error code only: the server's message stays out of status
        msg = f"{what}: HTTP {status} {code or 'S3Error'}"
        if code in ("NoSuchBucket", "NoSuchKey", "NotFound") or status == 404:
            return base.SourceNotFound(msg, reason=code or "NotFound")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken") or status in (401, 403):
            return base.SourceAuthError(msg, reason=code or "Unauthorized")
        if code == "PreconditionFailed" or status == 412:
            return base.SourceError(msg + " (the object changed during the transfer)",
                                    reason="SourceChanged", retryable=True)
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
            return base.SourceUnavailable(msg, reason=code or "SourceUnavailable")
        return base.SourceError(msg, reason=code or "S3Error")
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return base.SourceAuthError(msg, reason="NoCredentials")
    if isinstance(e, botocore.exceptions.BotoCoreError | OSError):
        return base.SourceUnavailable(msg)
    return base.SourceError(msg, reason="S3Error")


class _Body:
    def __init__(self, body: Any, offset: int, what: str) -> None:
        self.body = body
        self.offset = offset
        self.what = what
        raw = getattr(body, "_raw_stream", None)
        self._fp = getattr(raw, "_fp", None)

    def readinto(self, buf: memoryview) -> int:
        try:
            if self._fp is not None:
                return int(self._fp.readinto(buf))
            chunk = self.body.read(len(buf))
            buf[:len(chunk)] = chunk
            return len(chunk)
        except (*httpio.TRANSPORT_ERRORS, botocore.exceptions.BotoCoreError) as e:
            raise httpio.transport_error(e, self.what) from e

    def close(self) -> None:
        self.body.close()


class S3Source:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, session_token: str | None = None) -> None:
        if not re.match(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$", bucket):
            raise base.InvalidSourceError(f"not an S3 bucket name: {bucket[:100]!r}")
        prefix = prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}"
        endpoint = (endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            netpolicy.check(endpoint)  # before any connection
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=region or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            config=botocore.config.Config(
                connect_timeout=10, read_timeout=60, retries={"max_attempts": 3},
                max_pool_connections=16, s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required"),
        )
        self.etags: dict[str, str] = {}

    def _listing(self, pin: Any) -> Iterator[tuple[str, str, int]]:
        """Every object under the prefix as (key, ETag, size), in key order, folder markers
        left out; each goes into ``pin`` as it passes: the listing digest, the revision."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents") or []:
                key, etag = str(obj["Key"]), str(obj.get("ETag", ""))
                size = int(obj.get("Size", 0))
                if key.endswith("/") and size == 0:
                    continue  # a "folder" marker object
                pin.update(f"{key}\0{etag}\0{size}\n".encode())
                yield key, etag, size

    def latest(self, timeout: float | None = None) -> base.Latest:
        """The listing digest now (botocore's own connect and read timeouts apply)."""
        pin = hashlib.sha256()
        try:
            objects = sum(1 for _ in self._listing(pin))
        except Exception as e:  # botocore's errors, mapped in one place
            raise _map(e, self.uri) from e
        if not objects:
            raise base.SourceNotFound(f"{self.uri}: no objects under the prefix",
                                      reason="NoFiles")
        return base.Latest("sha256:" + pin.hexdigest())

    def resolve(self) -> base.Resolved:
        files: list[base.SourceFile] = []
        pin = hashlib.sha256()
        try:
            for key, etag, size in self._listing(pin):
                try:
                    path = safe_relpath(key[len(self.prefix):])
                except UnsafePathError as e:
                    raise base.UnsafeSourceError(f"{self.uri}: object key refused: {e}",
                                                 reason="UnsafePath") from e
                m = _MD5_ETAG.match(etag)
                files.append(base.SourceFile(
                    path, size, None, check=("md5", m.group(1)) if m else None,
                    version=etag))
                self.etags[path] = etag
                if len(files) > MAX_FILES:
                    raise base.UnsafeSourceError(f"{self.uri}: more than {MAX_FILES} objects",
                                                 reason="TooManyFiles")
        except base.SourceError:
            raise
        except Exception as e:  # botocore's errors, mapped in one place
            raise _map(e, self.uri) from e
        if not files:
            raise base.SourceNotFound(f"{self.uri}: no objects under the prefix",
                                      reason="NoFiles")
        files = [self._with_sha256(f) for f in files] if len(files) <= 64 else files
        return base.Resolved("sha256:" + pin.hexdigest(), tuple(sorted(files, key=lambda f: f.path)),
                             {"bucket": self.bucket, "prefix": self.prefix})

    def _with_sha256(self, f: base.SourceFile) -> base.SourceFile:
        """Use an object's stated full-object SHA-256 checksum as its digest, if it has one."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.prefix + f.path,
                                           ChecksumMode="ENABLED")
        except Exception as e:
            raise _map(e, f"{self.uri}{f.path}") from e
        stated = head.get("ChecksumSHA256")
        if stated and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" and "-" not in stated:
            try:
                hexd = base64.b64decode(stated).hex()
            except ValueError:
                return f
            if len(hexd) == 64:
                return base.SourceFile(f.path, f.size, "sha256:" + hexd, f.check, f.archive,
                                       f.version)
        return f

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + file.path}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        etag = self.etags.get(file.path) or file.version
        if etag:
            kwargs["IfMatch"] = etag
        try:
            resp = self.client.get_object(**kwargs)
        except Exception as e:
            raise _map(e, f"{self.uri}{file.path}") from e
        what = f"{self.uri}{file.path}"
        if not offset or not resp.get("ContentRange"):
            return _Body(resp["Body"], 0, what)  # the whole object: staging restarts at 0
        start = httpio.content_range_start(str(resp["ContentRange"]))
        if start != offset:
            resp["Body"].close()
            raise base.SourceError(f"{what}: asked for byte {offset}, got {start}",
                                   reason="BadContentRange", retryable=True)
        return _Body(resp["Body"], start, what)

    def close(self) -> None:
        self.client.close()
