"""An OCI registry client that verifies every byte it moves.

oras-py speaks the protocol and the auth (token realms, docker config,
basic auth); it streams downloads in 8 KiB pieces without checking the
digest and reads a whole blob into memory to upload it. So the blob I/O is
ours: downloads read >= 1 MiB at a time straight into a ``PartialBlob``
that hashes in the same pass, resume with ``Range`` after a dropped
connection, and are renamed into place only when the digest matches;
uploads stream once through a PATCH while hashing (a file, or another
server's response: a catalog import copies blob to blob without a local
copy), are committed only when they hash to the digest expected of them,
and the registry checks the digest we then PUT; a file already hashed goes
with sendfile, from an offset when it sits inside an archive. Transport and
HTTP failures map to ``RegistryError`` with the retry decision made here,
once.

Why one file of ~600 lines: every method here shares the session, the
credentials and the one error mapping (``_raise_for``/``_with_retries``);
split apart, the blob I/O would reach into the client's private state from
another module. The halves are kept apart inside: manifests and tags, then
downloads, then uploads.

oras-py is imported on first need (a token realm's challenge, a docker
config to read): its import pulls in jsonschema and costs ~0.1-0.3 s of
CPU, a tenth of a whole 2 GiB pull, and an anonymous or basic-auth pull
never needs it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.cookiejar
import logging
import mmap
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import requests

from modelpack import digest as dg
from modelpack.errors import (
    AuthError,
    IntegrityError,
    NotFoundError,
    RegistryError,
)
from modelpack.oci import mediatypes as mt
from modelpack.oci import ranged
from modelpack.oci.reference import Reference
from modelpack.store.blobs import PartialBlob

if TYPE_CHECKING:  # the mirrors are built on this client; set by modelpack.oci.mirrors
    from modelpack.oci.mirrors import MirrorSet

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
MANIFEST_ACCEPT = ", ".join([mt.OCI_MANIFEST, mt.DOCKER_MANIFEST, mt.OCI_INDEX])
READ = 4 << 20
MAX_MANIFEST = 4 << 20  # a manifest or index this large is not one
MAX_BODY = 16 << 20  # any other answer read whole (tag lists, push replies)
MAX_ERROR_BODY = 4 << 10  # an error answer: only for the message
_CHUNK = 64 << 10


def read_capped(resp: requests.Response, limit: int, what: str) -> bytes:
    """The body of a streamed response, read at most ``limit`` + one chunk into memory.

    An announced or actual length over ``limit`` raises RegistryError(reason
    ``TooLarge``) as soon as it is seen, and the connection is closed unread, so
    a hostile server cannot make us buffer more than ``limit`` + 64 KiB.
    """
    try:
        announced = resp.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > limit:
            raise RegistryError(f"{what} is over {limit} bytes", reason="TooLarge")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise RegistryError(f"{what} is over {limit} bytes", reason="TooLarge")
        except requests.RequestException as e:
            raise RegistryError(f"{what}: {type(e).__name__}: {e}", retryable=True,
                                reason="RegistryUnavailable") from e
        return bytes(buf)
    finally:
        resp.close()


def preload(resp: requests.Response, limit: int, what: str) -> None:
    """Read a streamed response's body now, bounded, so ``.content``/``.json()`` work."""
    raw = read_capped(resp, limit, what)
    resp._content = raw
    resp._content_consumed = True  # type: ignore[attr-defined]


def error_text(resp: requests.Response) -> str:
    """At most ``MAX_ERROR_BODY`` bytes of an error answer, decoded; closes ``resp``."""
    try:
        raw = resp.raw.read(MAX_ERROR_BODY, decode_content=True) if resp.raw else b""
        return bytes(raw or b"").decode("utf-8", "replace")
    except Exception:  # the body is only for the message
        return ""
    finally:
        resp.close()


def _noop(_: int) -> None:
    pass


class _TimeoutSession(requests.Session):
    """A session whose every request has a connect and read timeout."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self.timeout = timeout
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        # requests lets $REQUESTS_CA_BUNDLE override a session's own CA file
        # unless the request names one, so a ca_bundle would be ignored
        kwargs.setdefault("verify", self.verify)
        return super().request(*args, **kwargs)


class _Sized:
    """A streamed request body of known length.

    requests sends an iterable with a ``__len__`` under ``Content-Length``,
    each chunk as it comes; a plain generator would go chunked, and urllib3
    copies every chunk into a new bytes object to frame it (a fresh 4 MiB
    allocation, page faults included, per chunk). The generator must raise
    rather than end short: the server would wait for the missing bytes.
    """

    def __init__(self, chunks: Iterator[bytes | memoryview], size: int) -> None:
        self.chunks = chunks
        self.size = size

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return self.chunks

    def __len__(self) -> int:
        return self.size


class RegistryClient:
    """One registry host; thread-safe for concurrent blob transfers."""

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        ca_bundle: str | None = None,
        timeout: tuple[float, float] = (10.0, 120.0),
        retries: int = 4,
        ranges: ranged.RangePolicy | None = None,
    ) -> None:
        self.host = host
        self.ranges = ranges or ranged.RangePolicy()  # how a large blob is split
        self.mirrors: MirrorSet | None = None  # asked first for content by digest
        self.insecure = insecure
        self.retries = retries
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self._tls_verify: bool | str = ca_bundle or True
        session = _TimeoutSession(timeout)
        # oras-py's policy: no cookies (Harbor takes one as a browser and asks for CSRF)
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        session.verify = ca_bundle or True
        self.session = session
        self._registry: Any = None  # the oras-py Registry, built by _oras on first need
        self._registry_lock = threading.Lock()  # transfer threads may meet a challenge at once
        self._credentials = (username, password or "") if username is not None else None
        self._token = token if username is None else None
        self._basic: str | None = None
        if username is not None:
            self._basic = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        elif token is None:
            self._load_docker_config()

    @property
    def _oras(self) -> Any:
        """oras-py's Registry on our session, with our credentials; imported on first use."""
        with self._registry_lock:
            if self._registry is None:
                import oras.provider

                reg = oras.provider.Registry(hostname=self.host, insecure=self.insecure,
                                             tls_verify=self._tls_verify)
                reg.session = self.session
                reg.auth.session = self.session
                if self._credentials is not None:
                    reg.auth.set_basic_auth(*self._credentials)
                elif self._token is not None:
                    reg.auth.set_token_auth(self._token)
                self._registry = reg
            return self._registry

    def _bearer(self) -> str | None:
        """The bearer token to send: oras-py's once it runs the auth, else the one given."""
        if self._registry is None:
            return self._token
        token: str | None = getattr(self._registry.auth, "token", None)
        return token

    def _load_docker_config(self) -> None:
        # docker's own convention: $DOCKER_CONFIG/config.json, else ~/.docker/config.json
        configs = []
        if os.environ.get("DOCKER_CONFIG"):
            configs.append(os.path.join(os.environ["DOCKER_CONFIG"], "config.json"))
        default = os.path.expanduser("~/.docker/config.json")
        if not any(os.path.exists(c) for c in [*configs, default]):
            return  # nothing to read: leave oras-py unimported until a challenge asks for it
        try:
            container = self._oras.get_container(f"{self.host}/x")
            self._oras.auth.load_configs(container, configs=configs or None)
        except Exception as e:  # a broken docker config must not stop anonymous access
            log.debug("docker config not loaded", extra={"error": str(e)})
        basic = getattr(self._oras.auth, "_basic_auth", None)
        if basic:
            self._basic = basic

    # -- requests ---------------------------------------------------------

    def request(self, method: str, path_or_url: str, *, headers: dict[str, str] | None = None,
                data: Any = None, stream: bool = False, ok: tuple[int, ...] = (200,),
                what: str = "") -> requests.Response:
        """One request with auth; non-``ok`` statuses become RegistryError."""
        url = path_or_url if path_or_url.startswith("http") else self.base + path_or_url
        h = dict(headers or {})
        token = self._bearer()
        if token:
            h["Authorization"] = f"Bearer {token}"
        elif self._basic:
            # a Basic realm (htpasswd) is answered up front, so a streamed body is sent once
            h["Authorization"] = f"Basic {self._basic}"
        try:
            # always streamed: a body is read only through read_capped/error_text (bounded)
            resp = self.session.request(method, url, data=data, headers=h, stream=True)
            challenge = resp.headers.get("Www-Authenticate", "")
            if resp.status_code == 401 and challenge.lower().startswith("bearer"):
                # token realms: oras-py runs the token dance and retries the request
                if data is not None and not isinstance(data, bytes | str):
                    resp.close()
                    raise RegistryError(f"{method} {what or url}: token needed before a "
                                        "streamed body", retryable=True, reason="TokenExpired")
                resp.close()
                h.pop("Authorization", None)
                registry = self._oras
                if token:
                    registry.auth.token = None
                # oras-py wraps do_request in a retry loop that sleeps ~130 s on a
                # refused login; the retry decision is ours, so call it unwrapped
                do_request = type(registry).do_request.__wrapped__
                resp = do_request(registry, url, method, data=data, headers=h, stream=True)
        except requests.RequestException as e:
            raise RegistryError(f"{method} {what or url}: {type(e).__name__}: {e}",
                                retryable=True, reason="RegistryUnavailable") from e
        except ValueError as e:  # oras: "Cannot respond to request for authentication."
            raise AuthError(f"{method} {what or url}: {e}", status=401) from e
        if resp.status_code in ok:
            if not stream and method != "HEAD":
                preload(resp, MAX_BODY, f"{method} {what or url}")
            return resp
        self._raise_for(resp, method, what or url)
        raise AssertionError("unreachable")

    def _raise_for(self, resp: requests.Response, method: str, what: str) -> None:
        code = resp.status_code
        body = error_text(resp)[:300]
        msg = f"{method} {what}: HTTP {code} {body}".strip()
        if code in (401, 403):
            raise AuthError(msg, status=code)
        if code == 404:
            raise NotFoundError(msg, status=code)
        if code == 416:
            raise RegistryError(msg, status=code, retryable=True, reason="RangeNotSatisfiable")
        raise RegistryError(msg, status=code, retryable=code >= 500 or code == 429)

    def _with_retries(self, what: str, fn: Callable[[], Any]) -> Any:
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except RegistryError as e:
                if not e.retryable or attempt == self.retries:
                    raise
                log.info("retrying", extra={"what": what, "attempt": attempt + 1,
                                            "error": str(e)[:200]})
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    # -- manifests --------------------------------------------------------

    def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        """(bytes, digest, media type) of a manifest; verified when pinned by digest."""
        if self.mirrors is not None and ref.digest:
            found = self.mirrors.get_manifest(ref)
            if found is not None:
                return found
        path = f"/v2/{ref.repository}/manifests/{ref.ref}"

        def get() -> tuple[bytes, str, str]:
            resp = self.request("GET", path, headers={"Accept": MANIFEST_ACCEPT},
                                stream=True, what=str(ref))
            raw = read_capped(resp, MAX_MANIFEST, f"manifest of {ref}")
            got = dg.of_bytes(raw)
            if ref.digest and got != ref.digest:
                raise IntegrityError(f"manifest of {ref} hashes to {got}")
            return raw, got, resp.headers.get("Content-Type", "")

        result: tuple[bytes, str, str] = self._with_retries(str(ref), get)
        return result

    def put_manifest(self, repository: str, ref: str, raw: bytes,
                     media_type: str = mt.OCI_MANIFEST) -> str:
        resp = self._with_retries(repository, lambda: self.request(
            "PUT", f"/v2/{repository}/manifests/{ref}", data=raw,
            headers={"Content-Type": media_type}, ok=(201, 200), what=f"{repository}:{ref}"))
        got = dg.of_bytes(raw)
        server = resp.headers.get("Docker-Content-Digest")
        if server and server != got:
            raise IntegrityError(f"registry stored manifest as {server}, we sent {got}")
        return got

    def delete_manifest(self, repository: str, digest: str) -> None:
        try:
            self.request("DELETE", f"/v2/{repository}/manifests/{digest}", ok=(202, 200),
                         what=f"{repository}@{digest}")
        except NotFoundError:
            pass

    def list_tags(self, repository: str) -> list[str]:
        try:
            resp = self.request("GET", f"/v2/{repository}/tags/list", what=repository)
        except NotFoundError:
            return []
        tags = resp.json().get("tags") or []
        return [str(t) for t in tags]

    # -- blobs ------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        try:
            self.request("HEAD", f"/v2/{repository}/blobs/{digest}", what=digest)
            return True
        except NotFoundError:
            return False

    def get_blob_bytes(self, repository: str, digest: str, limit: int = 16 << 20) -> bytes:
        """A small blob (a config) in memory, verified."""
        if self.mirrors is not None:
            found = self.mirrors.get_blob_bytes(repository, digest, limit)
            if found is not None:
                return found
        raw = self._with_retries(digest, lambda: read_capped(self.request(
            "GET", f"/v2/{repository}/blobs/{digest}", stream=True, what=digest),
            limit, f"blob {digest}"))
        if dg.of_bytes(raw) != digest:
            raise IntegrityError(f"blob {digest} from {repository} does not match its digest")
        return bytes(raw)

    def download_blob(self, repository: str, digest: str, size: int, part: PartialBlob,
                      progress: Progress = _noop) -> None:
        """Fill ``part`` with the blob, resuming with Range after drops; caller commits.

        Bytes already in ``part`` (from a crash or an earlier attempt) are kept
        and reported to ``progress`` first. A blob of ``self.ranges.min_size``
        or more goes over ``self.ranges.streams`` byte ranges at once
        (``modelpack.oci.ranged``) where one stream proves slow (or at once
        with ``probe=0``, or to resume recorded ranges), unless the server
        ignores Range. With ``mirrors``, they are asked first
        (``modelpack.oci.mirrors``).
        """
        if self.mirrors is not None and not part.present and \
                self.mirrors.download_blob(repository, digest, size, part, progress):
            return
        probe = None
        if not part.present and self.ranges.applies(size):
            if part.ranges is not None or not self.ranges.probe:
                if ranged.download(self, repository, digest, size, part, self.ranges,
                                   progress):
                    return
            else:
                probe = ranged.Probe(self.ranges)
        part.drop_ranges()  # one stream continues the hashed prefix
        if part.offset:
            progress(part.offset)
        attempts = 0
        delay = 0.2
        while part.offset < size or size == 0:
            start = part.offset
            headers = {"Range": f"bytes={start}-"} if start else {}
            try:
                resp = self.request("GET", f"/v2/{repository}/blobs/{digest}", headers=headers,
                                    stream=True, ok=(200, 206), what=digest)
                if start and resp.status_code == 200:
                    progress(-start)
                    part.restart()  # the server ignored Range: take it from the top
                if not self._drain(resp, part, size, progress, probe):
                    # one stream is slow: the rest in ranges, from its hashed prefix
                    probe = None
                    progress(-part.offset)  # ranged.download reports the prefix itself
                    if ranged.download(self, repository, digest, size, part, self.ranges,
                                       progress):
                        return
                    progress(part.offset)  # Range ignored: on with one stream
                    continue
                if size == 0:
                    break
            except RegistryError as e:
                if not e.retryable or attempts >= self.retries:
                    raise
            except (requests.RequestException, OSError) as e:
                if isinstance(e, OSError) and not isinstance(e, requests.RequestException) \
                        and getattr(e, "errno", None) is not None:
                    raise  # a local write error (disk full) is not the registry's
                if attempts >= self.retries:
                    raise RegistryError(f"GET blob {digest}: {e}", retryable=True,
                                        reason="RegistryUnavailable") from e
            else:
                if part.offset >= size:
                    break
            if part.offset == start:
                attempts += 1  # no progress at all this round
            else:
                attempts = 0
            log.info("resuming blob", extra={"digest": digest, "offset": part.offset})
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    @staticmethod
    def _drain(resp: requests.Response, part: PartialBlob, size: int,
               progress: Progress, probe: ranged.Probe | None = None) -> bool:
        """Write the body into ``part``; False where ``probe`` found the stream slow
        (it stops there, the connection closed, the prefix written and hashed)."""
        try:
            raw = resp.raw
            fp = getattr(raw, "_fp", None)  # http.client response: readinto without a copy
            buf = mmap.mmap(-1, READ)  # page-aligned, so the store can write it with O_DIRECT
            view = memoryview(buf)
            if fp is not None and not raw.headers.get("Content-Encoding"):
                while True:
                    n = fp.readinto(view)
                    if not n:
                        break
                    part.write(view[:n])
                    progress(n)
                    if probe is not None and part.offset < size and probe.slow(part.offset):
                        return False
            else:
                while True:
                    chunk = raw.read(READ, decode_content=False)
                    if not chunk:
                        break
                    part.write(chunk)
                    progress(len(chunk))
            if part.offset < size:
                raise requests.ConnectionError(
                    f"connection closed at byte {part.offset} of {size}")
            return True
        finally:
            resp.close()

    def upload_blob(self, repository: str, open_stream: Callable[[], Any], size: int,
                    progress: Progress = _noop, digest: str | None = None,
                    before_commit: Callable[[], None] | None = None,
                    check_present: bool = True) -> str:
        """Upload a blob in one pass, hashing as it streams; return its digest.

        ``open_stream`` returns a fresh binary stream (called again on retry);
        one with ``readinto`` is read into a reused 4 MiB buffer, so the bytes
        are not copied on the way in. An exception the stream raises leaves
        this call as it is (a ``RegistryError`` subclass with ``retryable``
        set is retried here with a fresh stream): this is also the path for a
        blob streamed from another server's response. If ``digest`` is known
        and the registry has the blob, nothing is sent (one HEAD, skipped with
        ``check_present=False`` when the caller has just asked). The registry
        commits the blob only after exactly ``size`` bytes arrived, hashed to
        ``digest`` (when given) and ``before_commit`` (a format check of what
        went by) returned; otherwise the upload session is cancelled and
        nothing is visible.
        """
        if digest is not None and check_present and self.blob_exists(repository, digest):
            progress(size)
            return digest

        def once() -> str:
            sent = 0
            resp = self.request("POST", f"/v2/{repository}/blobs/uploads/", ok=(202,),
                                what=f"{repository} upload")
            location = self._location(resp)
            hasher = hashlib.sha256()

            def body() -> Iterator[bytes | memoryview]:
                nonlocal sent
                with open_stream() as f:
                    readinto: Callable[[memoryview], int | None] | None = \
                        getattr(f, "readinto", None)
                    view = memoryview(bytearray(READ))
                    while True:
                        # at most ``size`` bytes go out, then one more read must find the end
                        want = min(READ, size - sent) or 1
                        if readinto is not None:
                            # urllib3 sends each chunk before it asks for the next:
                            # the buffer is free again when the generator resumes
                            chunk: bytes | memoryview = view[:readinto(view[:want]) or 0]
                        else:
                            chunk = f.read(want)
                        if not chunk:
                            break
                        if sent == size:
                            raise IntegrityError(f"source gave more than {size} bytes",
                                                 reason="SizeMismatch")
                        hasher.update(chunk)
                        sent += len(chunk)
                        progress(len(chunk))
                        yield chunk
                if sent != size:  # stop the request: the registry waits for Content-Length
                    raise IntegrityError(f"source gave {sent} bytes, expected {size}",
                                         reason="SizeMismatch")

            try:
                try:
                    resp = self.request("PATCH", location, data=_Sized(body(), size),
                                        ok=(202,),
                                        headers={"Content-Type": "application/octet-stream"},
                                        what=f"{repository} upload")
                except BaseException:
                    progress(-sent)
                    raise
                location = self._location(resp)  # the session's state moved with the PATCH
                got = "sha256:" + hasher.hexdigest()
                if digest is not None and got != digest:
                    raise IntegrityError(f"source hashes to {got}, expected {digest}")
                if before_commit is not None:
                    before_commit()
            except BaseException:
                self._cancel_upload(location)
                raise
            sep = "&" if "?" in location else "?"
            self.request("PUT", f"{location}{sep}digest={urllib.parse.quote(got)}",
                         ok=(201,), what=f"{repository} commit {got}")
            return got

        result: str = self._with_retries(f"upload to {repository}", once)
        return result

    def _cancel_upload(self, location: str) -> None:
        """Best effort: drop an upload session that must never be committed.

        Not needed for safety (an uncommitted upload is no blob, and the
        registry purges stale ones), only to free its space now.
        """
        try:
            self.request("DELETE", location, ok=(204, 202, 200, 404),
                         what="cancel upload")
        except Exception as e:  # the refusal that brought us here is the error to report
            log.debug("upload not cancelled", extra={"error": str(e)[:200]})

    def upload_bytes(self, repository: str, data: bytes) -> str:
        digest = dg.of_bytes(data)
        if self.blob_exists(repository, digest):
            return digest

        def once() -> str:
            resp = self.request("POST", f"/v2/{repository}/blobs/uploads/", ok=(202,),
                                what=f"{repository} upload")
            location = self._location(resp)
            sep = "&" if "?" in location else "?"
            self.request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", data=data,
                         headers={"Content-Type": "application/octet-stream"}, ok=(201,),
                         what=f"{repository} commit {digest}")
            return digest

        result: str = self._with_retries(f"upload to {repository}", once)
        return result

    def _location(self, resp: requests.Response) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError("upload response without Location", reason="ProtocolError")
        if loc.startswith("/"):
            loc = self.base + loc
        return loc

    def upload_file(self, repository: str, path: str, size: int, digest: str,
                    progress: Progress = _noop, offset: int = 0) -> None:
        """Ensure the registry has blob ``digest``, the already-hashed file at ``path``
        (or its ``size`` bytes from ``offset``: a blob inside an archive).

        Skipped when present (one HEAD). Otherwise one POST/PATCH/PUT; on a
        plain-HTTP registry the PATCH body goes with sendfile (no copy
        through Python, no second hash: the registry checks the digest we
        commit), else it is streamed in 4 MiB reads.
        """
        if self.blob_exists(repository, digest):
            progress(size)
            return
        delay = 0.2
        for attempt in range(self.retries + 1):
            sent = 0

            def body() -> Iterator[bytes]:
                nonlocal sent
                with open(path, "rb", buffering=0) as f:
                    f.seek(offset)
                    while sent < size:
                        chunk = f.read(min(READ, size - sent))
                        if not chunk:
                            return
                        sent += len(chunk)
                        progress(len(chunk))
                        yield chunk

            try:
                resp = self.request("POST", f"/v2/{repository}/blobs/uploads/", ok=(202,),
                                      what=f"{repository} upload")
                location = self._location(resp)
                # the credentials that opened the session (requests records what it sent)
                auth = resp.request.headers.get("Authorization")
                moved = self._patch_sendfile(location, path, size, auth, progress, offset) \
                    if location.startswith("http://") else None
                if moved is not None:
                    sent = size
                    location = moved if moved.startswith("http") else self.base + moved
                else:
                    if location.startswith("http://"):  # that session may hold a partial body
                        resp = self.request("POST", f"/v2/{repository}/blobs/uploads/",
                                              ok=(202,), what=f"{repository} upload")
                        location = self._location(resp)
                    resp = self.request("PATCH", location, data=body(), ok=(202,),
                                          headers={"Content-Type": "application/octet-stream"},
                                          what=f"{repository} upload {digest}")
                    location = self._location(resp)
                sep = "&" if "?" in location else "?"
                self.request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}",
                               ok=(201,), what=f"{repository} commit {digest}")
                return
            except RegistryError as e:
                progress(-sent)
                if not e.retryable or attempt == self.retries:
                    raise
                log.info("blob push failed, retrying", extra={"digest": digest, "error": str(e)[:200]})
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


    @staticmethod
    def _patch_sendfile(location: str, path: str, size: int, auth: str | bytes | None,
                        progress: Progress, offset: int = 0) -> str | None:
        """PATCH the whole file with sendfile; the new Location, or None to use the slow path.

        Anything but a clean 202 (a 401 for an expired token, a redirect, an
        old server) returns None after undoing the progress, and the caller
        streams the blob the ordinary way instead.
        """
        u = urllib.parse.urlsplit(location)
        conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=120)
        sent = 0
        try:
            conn.putrequest("PATCH", u.path + (f"?{u.query}" if u.query else ""),
                            skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(size))
            if auth:
                conn.putheader("Authorization", auth)
            conn.endheaders()
            assert conn.sock is not None
            with open(path, "rb") as f:
                while sent < size:
                    n = conn.sock.sendfile(f, offset + sent, min(size - sent, 64 << 20))
                    if not n:
                        break
                    sent += n
                    progress(n)
            resp = conn.getresponse()
            resp.read()
            location_out = resp.getheader("Location")
            if resp.status == 202 and location_out and sent == size:
                return location_out
            log.info("sendfile push refused, streaming instead", extra={"status": resp.status})
        except (OSError, http.client.HTTPException) as e:
            log.info("sendfile push failed, streaming instead", extra={"error": str(e)[:200]})
        finally:
            conn.close()
        progress(-sent)
        return None
