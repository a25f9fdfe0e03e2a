"""Registry references: ``host[:port]/repo/path[:tag][@sha256:...]``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelpack import digest as dg
from modelpack.errors import FormatError

_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Reference:
    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """What to ask the manifests endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = f"{self.host}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse(text: str) -> Reference:
    """Parse a reference; the host part is required (no implicit Docker Hub)."""
    s = text.strip()
    for scheme in ("oci://", "docker://"):
        if s.startswith(scheme):
            s = s[len(scheme):]
    digest = None
    if "@" in s:
        s, digest = s.split("@", 1)
        dg.validate(digest)
    if "/" not in s:
        raise FormatError(f"reference {text!r} has no registry host", reason="InvalidReference")
    host, rest = s.split("/", 1)
    tag = None
    if ":" in rest:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise FormatError(f"invalid tag {tag!r} in {text!r}", reason="InvalidReference")
    if not _REPO_RE.match(rest):
        raise FormatError(f"invalid repository {rest!r} in {text!r}", reason="InvalidReference")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host, rest, tag, digest)
