"""Ollama registry source: ``ollama://[HOST/]NAMESPACE/MODEL[:TAG]``.

An Ollama model is a Docker v2 manifest whose layers carry Ollama media
types: the GGUF weights (``…image.model``), optional adapter/projector
GGUFs, and small text layers (template, system, params, messages,
license). The weights become a weight layer under a ``.gguf`` name, the
text layers become config/doc files, and the config blob's
``model_format``/``model_family``/``model_type``/``file_type`` land in the
resolved metadata. Every layer is digest-addressed, so each file's sha256
is known before a byte moves. The registry protocol and its token auth
come from the core's ``RegistryClient``. ``latest`` is one manifest GET:
the tag's digest, which is also what ``resolve`` pins.
"""

from __future__ import annotations

import json
from typing import Any

from ingest.sources import base, httpio, netpolicy
from modelpack import digest as dg
from modelpack.errors import (
    AuthError,
    FormatError,
    IntegrityError,
    ModelPackError,
    NotFoundError,
    RegistryError,
)
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient

DEFAULT_HOST = "registry.ollama.ai"
OLLAMA = "application/vnd.ollama.image."
# layer kind -> file name in the model tree
FILE_NAMES = {
    "model": "model.gguf",
    "adapter": "adapter.gguf",
    "projector": "projector.gguf",
    "template": "template",
    "system": "system",
    "params": "params.json",
    "messages": "messages.json",
    "license": "LICENSE",
}
CONFIG_KEYS = ("model_format", "model_family", "model_families", "model_type", "file_type")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def parse_uri(rest: str) -> tuple[str, str, str]:
    """``[HOST/]NS/MODEL[:TAG]`` (or ``MODEL[:TAG]`` in ``library``) -> (host, repo, tag)."""
    parts = rest.split("/")
    host = DEFAULT_HOST
    if len(parts) >= 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host, parts = parts[0], parts[1:]
    if len(parts) == 1:
        parts = ["library", *parts]
    if len(parts) != 2 or not all(parts):
        raise base.InvalidSourceError(f"not an Ollama model name: {rest[:100]!r}")
    name, tag = parts[1], "latest"
    if ":" in name:
        name, tag = name.rsplit(":", 1)
    return host, f"{parts[0]}/{name}", tag


def _map(e: ModelPackError, what: str) -> base.SourceError:
    if (denied := netpolicy.denial(e)) is not None:  # the connect guard: terminal as it is
        return denied
    msg = f"{what}: {httpio.cut(str(e), 300)}"
    if isinstance(e, NotFoundError):
        return base.SourceNotFound(msg)
    if isinstance(e, AuthError):
        return base.SourceAuthError(msg)
    if isinstance(e, RegistryError) and e.retryable:
        return base.SourceUnavailable(msg)
    if isinstance(e, IntegrityError):  # a manifest or config unlike its digest stays one
        return base.SourceIntegrityError(msg, reason=e.reason)
    return base.SourceError(msg, reason=e.reason)


class OllamaSource:
    def __init__(self, host: str, repository: str, tag: str = "latest", *,
                 insecure: bool | None = None, username: str | None = None,
                 password: str | None = None, token: str | None = None) -> None:
        if insecure is None:  # like docker, a loopback registry speaks plain HTTP
            insecure = host.split(":")[0] in LOOPBACK or host.startswith("[::1]")
        self.ref = Reference(host, repository, tag)
        self.uri = f"ollama://{host}/{repository}:{tag}"
        netpolicy.check(f"http://{host}")  # before any connection (ingest.sources.netpolicy)
        try:
            self.client = RegistryClient(host, insecure=insecure, username=username,
                                         password=password, token=token, retries=2)
        except ModelPackError as e:
            raise _map(e, self.uri) from e
        self.digests: dict[str, str] = {}

    def latest(self, timeout: float | None = None) -> base.Latest:
        if timeout is not None:
            self.client.session.timeout = (httpio.PROBE_CONNECT, timeout)
        try:
            _, digest, _ = self.client.get_manifest(self.ref)
        except ModelPackError as e:
            raise _map(e, self.uri) from e
        return base.Latest(digest)

    def resolve(self) -> base.Resolved:
        try:
            raw, digest, _ = self.client.get_manifest(self.ref)
            manifest = json.loads(raw)
            cfg_desc = manifest.get("config") or {}
            config: dict[str, Any] = {}
            if cfg_desc.get("digest"):
                cfg_raw = self.client.get_blob_bytes(self.ref.repository,
                                                     dg.validate(str(cfg_desc["digest"])),
                                                     limit=1 << 20)
                config = json.loads(cfg_raw)
        except ModelPackError as e:
            raise _map(e, self.uri) from e
        except (ValueError, TypeError) as e:
            raise base.SourceError(f"{self.uri}: manifest or config is not JSON",
                                   reason="InvalidManifest") from e
        files: list[base.SourceFile] = []
        seen: dict[str, int] = {}
        for layer in manifest.get("layers") or []:
            media = str(layer.get("mediaType", ""))
            if not media.startswith(OLLAMA):
                continue  # not an Ollama file (a foreign layer): not part of the model
            kind = media[len(OLLAMA):]
            name = FILE_NAMES.get(kind)
            if name is None:
                continue
            try:
                digest_l = dg.validate(str(layer.get("digest")))
            except FormatError as e:
                raise base.SourceError(f"{self.uri}: {e}", reason="InvalidManifest") from e
            size = layer.get("size")
            if not isinstance(size, int) or size < 0:
                raise base.SourceError(f"{self.uri}: layer {digest_l} has no valid size",
                                       reason="InvalidManifest")
            n = seen.get(name, 0)
            seen[name] = n + 1
            if n:  # a second license or adapter keeps its own file
                stem, dot, ext = name.partition(".")
                name = f"{stem}-{n + 1}{dot}{ext}"
            files.append(base.SourceFile(name, size, digest_l))
            self.digests[name] = digest_l
        if not any(f.path == "model.gguf" for f in files):
            raise base.SourceError(f"{self.uri}: no {OLLAMA}model layer (GGUF weights)",
                                   reason="NoWeights")
        meta = {k: config[k] for k in CONFIG_KEYS if k in config}
        meta["manifestDigest"] = digest
        meta["model"] = f"{self.ref.repository}:{self.ref.tag}"
        return base.Resolved(digest, tuple(files), meta)

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        digest = self.digests.get(file.path) or file.sha256
        if not digest:
            raise base.SourceError(f"{file.path} is not a layer of {self.uri}",
                                   reason="NotResolved")
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self.client.request("GET", f"/v2/{self.ref.repository}/blobs/{digest}",
                                       headers=headers, stream=True, ok=(200, 206),
                                       what=digest)
        except ModelPackError as e:
            raise _map(e, self.uri) from e
        start = offset if resp.status_code == 206 else 0
        return httpio.ResponseStream(resp, start, f"{self.uri} {digest}")

    def close(self) -> None:
        self.client.session.close()
