"""Model sources behind one interface (``base.Source``), and a URI resolver.

``open_source`` turns what a user types into a source:
``hf://ORG/REPO[@REV]``, ``ollama://[HOST/]NS/MODEL[:TAG]``,
``http(s)://…``, ``s3://BUCKET/PREFIX``, ``catalog+https://HOST#MODEL[@DIGEST]``
(another cluster's catalog API) or a local directory. Credentials
and options come as keyword arguments (the CLI takes them from flags and
the environment, the controller from Secrets); each source ignores the
ones that are not its own.

Each source module is imported when its scheme is first opened, not here:
for start-up time (``huggingface_hub`` takes about 0.6 s to import,
``boto3`` 0.2 s, and a process opens one kind of source at most).
"""

from __future__ import annotations

import os
from typing import Any

from ingest.sources import base
from ingest.sources.base import (
    InvalidSourceError,
    Resolved,
    Source,
    SourceError,
    SourceFile,
)

__all__ = ["InvalidSourceError", "Resolved", "Source", "SourceError", "SourceFile",
           "open_source"]


def _pick(kw: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: kw[n] for n in names if kw.get(n) is not None}


def open_source(uri: str, **creds: Any) -> Source:
    """Resolve a source URI to a ``Source``; raises ``InvalidSourceError`` if it names none.

    Keywords: ``token`` (HF token or HTTP bearer), ``endpoint`` (HF endpoint or
    S3 endpoint URL), ``include``/``exclude`` (HF globs), ``sha256``/``archive``/
    ``headers`` (HTTP), ``region``/``access_key``/``secret_key``/``session_token``
    (S3), ``insecure``/``username``/``password`` (Ollama registry), ``ca_pem`` (catalog).
    """
    if uri.startswith("hf://"):
        # on first use, for start-up time (see the module docstring)
        from ingest.sources.huggingface import HuggingFaceSource

        rest = uri[len("hf://"):]
        repo, _, rev = rest.partition("@")
        return HuggingFaceSource(repo.strip("/"), rev or "main",
                                 **_pick(creds, "token", "endpoint", "include", "exclude"))
    if uri.startswith("ollama://"):
        # on first use, for start-up time (see the module docstring)
        from ingest.sources.ollama import OllamaSource, parse_uri

        host, repo, tag = parse_uri(uri[len("ollama://"):])
        return OllamaSource(host, repo, tag,
                            **_pick(creds, "insecure", "username", "password", "token"))
    if uri.startswith("catalog+"):
        # on first use, for start-up time (see the module docstring)
        from ingest.sources.catalog import CatalogSource

        return CatalogSource(uri, **_pick(creds, "token", "ca_pem"))
    if uri.startswith(("http://", "https://")):
        # on first use, for start-up time (see the module docstring)
        from ingest.sources.url import UrlSource

        return UrlSource(uri, **_pick(creds, "sha256", "archive", "headers", "token",
                                      "filename"))
    if uri.startswith("s3://"):
        # on first use, for start-up time (see the module docstring)
        from ingest.sources.s3 import S3Source

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        kw = _pick(creds, "region", "access_key", "secret_key", "session_token")
        if creds.get("endpoint"):
            kw["endpoint"] = creds["endpoint"]
        return S3Source(bucket, prefix, **kw)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if os.path.isdir(path):
        # on first use, for start-up time (see the module docstring)
        from ingest.sources.local import LocalDirSource

        return LocalDirSource(path)
    if "://" in uri:
        raise InvalidSourceError(f"unknown source scheme in {uri[:100]!r} "
                                 "(hf://, ollama://, http(s)://, s3://, catalog+https:// or a directory)")
    raise base.SourceNotFound(f"{uri[:200]} is not a directory", reason="NotADirectory")
