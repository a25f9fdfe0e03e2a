"""HTTP(S) URL source: one model file, or a tar/zip archive of a model.

``resolve`` asks the server (HEAD, else a one-byte ranged GET) for the
size, the ETag and the file name; the ETag (or Last-Modified) is the
resolved revision and guards a resumed transfer with ``If-Range``, so a
file that changed between restarts is fetched whole rather than spliced.
An expected sha256 is checked in the same pass as the download. An
archive is staged as one blob and expanded by ``ingest.sources.archive``
under its safety bounds; a single file is published under its own name.
``latest`` is ``resolve``'s HEAD alone; a pinned sha256 never moves.
"""

from __future__ import annotations

import posixpath
import urllib.parse

from ingest.sources import base, httpio
from modelpack import digest as dg
from modelpack.errors import FormatError, UnsafePathError
from modelpack.paths import safe_relpath

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".zip")
ARCHIVE_MODES = ("Auto", "None", "Tar", "Zip")


class UrlSource:
    def __init__(self, url: str, *, sha256: str | None = None, archive: str = "Auto",
                 headers: dict[str, str] | None = None, token: str | None = None,
                 filename: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise base.InvalidSourceError(f"not an http(s) URL: {url[:100]!r}")
        if archive not in ARCHIVE_MODES:
            raise base.InvalidSourceError(f"archive must be one of {ARCHIVE_MODES}")
        self.url = url
        # the URI in messages and status never carries credentials or a signed query
        self.uri = urllib.parse.urlunsplit((parsed.scheme, parsed.hostname or "",
                                            parsed.path, "", ""))
        if sha256:
            sha256 = sha256 if sha256.startswith("sha256:") else "sha256:" + sha256
            try:
                dg.validate(sha256.lower())
            except FormatError as e:
                raise base.InvalidSourceError(f"expected sha256 is malformed: {e}") from e
            sha256 = sha256.lower()
        self.sha256 = sha256
        self.archive = archive
        self.headers = dict(headers or {})
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.filename = filename
        self.session = httpio.TimeoutSession()
        self.validator: str | None = None

    def _name(self, disposition: str | None) -> str:
        name = self.filename
        if not name and disposition and "filename=" in disposition:
            name = disposition.split("filename=", 1)[1].split(";")[0].strip().strip('"')
        if not name:
            name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(self.url).path))
        name = posixpath.basename(name or "")
        try:
            return safe_relpath(name)
        except UnsafePathError as e:
            raise base.UnsafeSourceError(f"{self.uri}: unusable file name: {e}",
                                         reason="UnsafePath") from e

    def _probe(self) -> tuple[int | None, dict[str, str]]:
        try:
            resp = self.session.head(self.url, headers=self.headers, allow_redirects=True)
            if resp.status_code not in (200, 404, 410):
                # no HEAD (405/501), or a presigned URL signed for GET only (403):
                # ask for one byte instead
                resp.close()
                resp = self.session.get(self.url, headers={**self.headers, "Range": "bytes=0-0"},
                                        stream=True)
                resp.close()
        except httpio.TRANSPORT_ERRORS as e:
            raise httpio.transport_error(e, self.uri) from e
        if resp.status_code not in (200, 206):
            httpio.raise_for(resp, self.uri)
        h = {k.lower(): v for k, v in resp.headers.items()}
        size: int | None = None
        if resp.status_code == 206 and "/" in h.get("content-range", ""):
            total = h["content-range"].rsplit("/", 1)[1]
            size = int(total) if total.isdigit() else None
        elif h.get("content-length", "").isdigit() and not h.get("content-encoding"):
            size = int(h["content-length"])
        return size, h

    def is_archive(self, name: str) -> bool:
        if self.archive in ("Tar", "Zip"):
            return True
        if self.archive == "None":
            return False
        return name.lower().endswith(ARCHIVE_SUFFIXES)

    def resolve(self) -> base.Resolved:
        size, h = self._probe()
        name = self._name(h.get("content-disposition"))
        etag = h.get("etag", "")
        self.validator = etag if etag and not etag.startswith("W/") else h.get("last-modified")
        revision = self.sha256 or etag.strip('"') or h.get("last-modified") or ""
        archive = self.is_archive(name)
        f = base.SourceFile(name, size, self.sha256, archive=archive,
                            version=self.validator or "")
        meta = {"url": self.uri, "archive": archive}
        return base.Resolved(revision, (f,), meta)

    def latest(self, timeout: float | None = None) -> base.Latest:
        if self.sha256:
            return base.Latest(None, "the content is pinned by sha256: it never moves")
        if timeout is not None:
            self.session.timeout = (httpio.PROBE_CONNECT, timeout)
        revision = self.resolve().revision  # a HEAD (or a one-byte GET): no download
        if not revision:
            return base.Latest(None, f"{self.uri} sends neither ETag nor Last-Modified: cannot "
                                     "tell whether it changed (set the modelcache.io/reimport "
                                     "annotation to publish it again)")
        return base.Latest(revision)

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        return httpio.open_range(self.session, self.url, offset, headers=self.headers,
                                 if_range=self.validator, what=self.uri)

    def close(self) -> None:
        self.session.close()
