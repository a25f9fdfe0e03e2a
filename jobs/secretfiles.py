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
"""

from __future__ import annotations

import os

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


def load(environ: os._Environ[str] | dict[str, str] | None = None) -> None:
    """Each ``VAR`` of ``CREDENTIALS`` whose ``VAR_FILE`` names a file: set from it."""
    env = os.environ if environ is None else environ
    for var in CREDENTIALS:
        value = read(env.get(f"{var}_FILE"))
        if value is not None:
            env[var] = value


__all__ = ["CREDENTIALS", "ca_file", "load", "read"]
