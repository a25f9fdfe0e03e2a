"""Hugging Face Hub source: ``hf://ORG/REPO[@REVISION]``.

Metadata goes through the real ``huggingface_hub`` client (``model_info``
pins the revision to a commit sha, ``list_repo_tree`` lists the files with
their sizes, LFS sha256 and git blob ids); its typed errors map to ours.
The bytes do not: ``snapshot_download`` resumes only inside one call and
deletes partial files, so we stream ``resolve/<sha>/<path>`` ourselves
with ``Range``, which lets the worker resume across restarts and hash in
the same pass. A large LFS file (its sha256 listed) is fetched as several
ranges at once where one stream proves slow (``open_range``;
``ingest.publish.ranges``): the Hub's CDN caps each connection, and
``snapshot_download`` reads each file as one stream. ``HF_ENDPOINT`` and
``HF_TOKEN`` are honoured. ``latest`` is ``model_info`` alone: the commit
the revision points at now.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from typing import Any

from huggingface_hub import HfApi, RepoFile, hf_hub_url
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from ingest.sources import base, httpio, netpolicy
from modelpack.errors import UnsafePathError
from modelpack.paths import safe_relpath

DEFAULT_ENDPOINT = "https://huggingface.co"
# ORG/NAME, or a bare NAME (the Hub's oldest models, e.g. "gpt2")
_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def endpoint_from_env() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _map_error(e: Exception, what: str) -> base.SourceError:
    if (denied := netpolicy.denial(e)) is not None:  # the connect guard, through the client
        return denied
    if isinstance(e, hf_errors.HfHubHTTPError):
        # the status and the error's class only: the server's text stays out of status
        status = e.response.status_code if e.response is not None else 0
        msg = f"{what}: HTTP {status} {type(e).__name__}"
    else:
        msg = f"{what}: {type(e).__name__}"
    if isinstance(e, hf_errors.GatedRepoError):
        return base.SourceAuthError(msg, reason="GatedRepo")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return base.SourceNotFound(msg + " (or it is private and the token does not grant it)",
                                   reason="RepoNotFound")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return base.SourceNotFound(msg, reason="RevisionNotFound")
    if isinstance(e, hf_errors.HfHubHTTPError):
        code = e.response.status_code if e.response is not None else 0
        if code in (401, 403):
            return base.SourceAuthError(msg)
        if code >= 500 or code == 429:
            return base.SourceUnavailable(msg)
        return base.SourceError(msg, reason="HubError")
    # the hub client's transport (httpx or httpx2, by version): down, refused, timed out
    if isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("httpx", "httpx2"):
        return base.SourceUnavailable(msg)
    return base.SourceError(msg, reason="HubError")


class HuggingFaceSource:
    """One repository at one revision; thread-safe."""

    def __init__(self, repo: str, revision: str = "main", *, token: str | None = None,
                 endpoint: str | None = None, include: Sequence[str] = (),
                 exclude: Sequence[str] = ()) -> None:
        if not _REPO_RE.match(repo) or ".." in repo:
            raise base.InvalidSourceError(f"not a Hugging Face repository id: {repo[:100]!r}")
        self.repo = repo
        self.revision = revision or "main"
        self.token = token if token is not None else os.environ.get("HF_TOKEN")
        self.endpoint = (endpoint or endpoint_from_env()).rstrip("/")
        netpolicy.check(self.endpoint)  # before any connection (the hub client's own too)
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.uri = f"hf://{repo}@{self.revision}"
        self.api = HfApi(endpoint=self.endpoint, token=self.token or False)
        # a large file takes up to ``RangePolicy.streams`` connections, several files at once
        self.session = httpio.TimeoutSession(pool=64)
        self.sha: str | None = None

    def _wanted(self, path: str) -> bool:
        if self.include and not any(fnmatch.fnmatch(path, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatch(path, p) for p in self.exclude)

    def _info(self, timeout: float | None = None) -> Any:
        """``model_info`` of the revision, which pins it to a commit sha."""
        try:
            info = self.api.model_info(self.repo, revision=self.revision, timeout=timeout)
        except Exception as e:  # the hub client's errors, mapped in one place
            raise _map_error(e, self.uri) from e
        if not info.sha or not _SHA_RE.match(info.sha):
            raise base.SourceError(f"{self.uri}: the Hub returned no commit sha",
                                   reason="HubError", retryable=True)
        return info

    def latest(self, timeout: float | None = None) -> base.Latest:
        if _SHA_RE.match(self.revision):
            return base.Latest(None, "the revision is a commit: it never moves")
        return base.Latest(str(self._info(timeout).sha))

    def resolve(self) -> base.Resolved:
        info = self._info()
        sha = str(info.sha)
        try:
            entries = list(self.api.list_repo_tree(self.repo, revision=sha, recursive=True))
        except Exception as e:
            raise _map_error(e, self.uri) from e
        files: list[base.SourceFile] = []
        seen: set[str] = set()
        for entry in entries:
            if not isinstance(entry, RepoFile):  # a folder
                continue
            raw = str(entry.path)
            try:
                path = safe_relpath(raw)
            except UnsafePathError as e:
                raise base.UnsafeSourceError(f"{self.uri} lists a hostile file name: {e}",
                                             reason="UnsafePath") from e
            if path != raw or path in seen:
                raise base.UnsafeSourceError(
                    f"{self.uri} lists {raw[:100]!r}, which is not a unique normalized path",
                    reason="UnsafePath")
            seen.add(path)
            if not self._wanted(path):
                continue
            lfs = entry.lfs
            if lfs is not None:
                files.append(base.SourceFile(path, int(lfs.size), "sha256:" + lfs.sha256))
            else:
                files.append(base.SourceFile(path, int(entry.size), None,
                                             check=("git-sha1", str(entry.blob_id))))
        if not files:
            raise base.SourceNotFound(f"{self.uri}: no files match", reason="NoFiles")
        self.sha = sha
        meta: dict[str, Any] = {"repo": self.repo, "requestedRevision": self.revision}
        for key in ("pipeline_tag", "library_name"):
            value = getattr(info, key, None)
            if value:
                meta[key] = value
        return base.Resolved(sha, tuple(sorted(files, key=lambda f: f.path)), meta)

    def _request(self, file: base.SourceFile) -> tuple[str, dict[str, str]]:
        """The ``resolve`` URL of ``file`` at the pinned commit, and the Hub's headers."""
        if self.sha is None:
            raise base.SourceError("resolve() before open()", reason="NotResolved")
        url = hf_hub_url(self.repo, file.path, revision=self.sha, endpoint=self.endpoint)
        # requests drops Authorization when the Hub redirects to its CDN on another host
        return url, build_hf_headers(token=self.token or False, library_name="modelcache")

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        url, headers = self._request(file)
        return httpio.open_range(self.session, url, offset, headers=headers,
                                 what=f"{self.uri}/{file.path}")

    def open_range(self, file: base.SourceFile, start: int, end: int) -> base.Stream | None:
        """Bytes ``[start, end)`` of an LFS file, one of several ranges at once (``base.Ranged``)."""
        if file.size is None:
            raise base.SourceError(f"{file.path}: a range of a file of unknown size",
                                   reason="NotResolved")
        url, headers = self._request(file)
        return httpio.open_exact(self.session, url, start, end, file.size, headers=headers,
                                 what=f"{self.uri}/{file.path}")

    def close(self) -> None:
        self.session.close()
