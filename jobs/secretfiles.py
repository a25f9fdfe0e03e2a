"""A Job's credentials, read from the files of its mounted Secret.

Where it sits: the manager's Jobs (``controller/jobspec.py``) carry no
secret in their command line or env values; each credential is a file of
one Secret mounted read-only, and the env var ``VAR_FILE`` holds its path.
``load`` runs first in each Job entry point (publish, materialize,
pvc-upload): it reads those files into this process's own environment, so
the clients below (Hugging Face, S3, the registry, the report endpoint)
find ``VAR`` as they always did. The process's environment is its own: not
in the Job's spec, not in ``/proc/PID/environ`` (which shows the env the
process was started with).

A ``VAR_FILE`` naming a file that is absent (an optional key the Secret
lacks) leaves ``VAR`` unset. Only the names in ``CREDENTIALS`` are read: a
``VAR_FILE`` cannot make the worker load an arbitrary variable.

A source credential (a tenant's Secret) is not among those files: the
manager never copies it. ``borrow`` asks for it at start, when
``MODELCACHE_CREDENTIALS_URL`` is set: ``GET`` with the report token as
bearer, over HTTPS trusting ``ca.crt`` of the Job's Secret (the manager's
side: ``controller/models/credentials.py``), and sets the answer's
variables (``SOURCE_CREDENTIALS`` only) in this process's environment, as
``load`` does.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request

CREDENTIALS = (
    "HF_TOKEN", "MODELCACHE_HTTP_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "MODELCACHE_CATALOG_TOKEN", "MODELCACHE_REGISTRY_USERNAME",
    "MODELCACHE_REGISTRY_PASSWORD", "MODELCACHE_REPORT_TOKEN", "MODELCACHE_UPLOAD_TOKEN",
    "MODELCACHE_SOURCE_USERNAME", "MODELCACHE_SOURCE_PASSWORD",
)


def read(path: str | None) -> str | None:
    """A credential from a file (a mounted Secret), stripped; None without a path or a file."""
    if not path:
        return None
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def ca_file(environ: dict[str, str] | None = None) -> str | None:
    """The registry's CA bundle (``MODELCACHE_REGISTRY_CA_FILE``, ``ca.crt`` of the Job's
    Secret) when the file is there: the path a registry client trusts; None otherwise."""
    path = (os.environ if environ is None else environ).get("MODELCACHE_REGISTRY_CA_FILE")
    return path if path and os.path.isfile(path) else None


# what the manager may lend (``publishjob.plan``'s SecretUse keys); never the registry's
SOURCE_CREDENTIALS = frozenset({
    "HF_TOKEN", "MODELCACHE_HTTP_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "MODELCACHE_CATALOG_TOKEN", "MODELCACHE_SOURCE_USERNAME",
    "MODELCACHE_SOURCE_PASSWORD"})
MAX_ANSWER = 64 << 10


class BorrowError(Exception):
    """The manager did not lend the source credential (the Job fails, retryable)."""


def borrow(environ: os._Environ[str] | dict[str, str] | None = None, *,
           attempts: int = 3, timeout: float = 10.0) -> None:
    """The source credential from ``MODELCACHE_CREDENTIALS_URL``; nothing without it.

    ``BorrowError`` when the manager refuses or cannot be reached after
    ``attempts`` (a 403/404/410 is not retried: it will not change)."""
    env = os.environ if environ is None else environ
    url = env.get("MODELCACHE_CREDENTIALS_URL")
    if not url:
        return
    token = env.get("MODELCACHE_REPORT_TOKEN") or read(env.get("MODELCACHE_REPORT_TOKEN_FILE"))
    if not token:
        raise BorrowError("no report token to borrow the source credential with")
    ctx = None
    if url.startswith("https://"):
        ctx = ssl.create_default_context(cafile=ca_file(dict(env)))
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    body = b""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                body = resp.read(MAX_ANSWER + 1)
            break
        except urllib.error.HTTPError as e:
            if e.code in (403, 404, 410) or attempt == attempts - 1:
                raise BorrowError(f"the manager refused the source credential: "
                                  f"HTTP {e.code}") from None
        except OSError as e:
            if attempt == attempts - 1:
                raise BorrowError(f"the manager's credential endpoint: "
                                  f"{type(e).__name__}") from None
        time.sleep(1.0 + attempt)
    if len(body) > MAX_ANSWER:
        raise BorrowError("the credential answer is too large")
    try:
        answer = json.loads(body)
    except ValueError:
        raise BorrowError("the credential answer is not JSON") from None
    if not isinstance(answer, dict):
        raise BorrowError("the credential answer is not an object")
    for var, value in answer.items():
        if var in SOURCE_CREDENTIALS and isinstance(value, str):
            env[var] = value.strip()


def load(environ: os._Environ[str] | dict[str, str] | None = None) -> None:
    """Each ``VAR`` of ``CREDENTIALS`` whose ``VAR_FILE`` names a file: set from it."""
    env = os.environ if environ is None else environ
    for var in CREDENTIALS:
        value = read(env.get(f"{var}_FILE"))
        if value is not None:
            env[var] = value


__all__ = ["CREDENTIALS", "SOURCE_CREDENTIALS", "BorrowError", "borrow", "ca_file", "load",
           "read"]
