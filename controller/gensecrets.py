"""``modelcache-controller gen-secrets``: the Secrets the plain manifests mount.

Where it sits: an install-time command, not part of the running manager. The
chart makes these Secrets itself (Helm ``lookup``, kept across upgrades);
the manifests under ``daemonset/`` expect them to exist, so this prints them
as one YAML stream for ``kubectl apply -f -``: the DMCR push user (its bcrypt
htpasswd line for the registry, the clear pair for the controller, the
publish Jobs and the gateway), the pull-only user of the read-only endpoint,
the report-token HMAC key and the upload gateway's admin token, in the same
format as ``charts/modelcache/templates/dmcr-secrets.yaml`` and
``upload-gateway.yaml``. Passwords are random (``secrets``), hashed with the
``bcrypt`` package; no ``htpasswd`` tool is needed.

Re-running must not rotate what runs: with ``--keep-existing`` the command
reads the namespace through the kubeconfig and leaves out every Secret that
already exists (a push password is reused for a missing htpasswd, so the
pair stays consistent). Without it every Secret is printed afresh (a first
install, or a deliberate rotation). The two Secrets the controller makes at
start (``CONTROLLER_MADE``) are never printed.
"""

from __future__ import annotations

import argparse
import base64
import secrets
import sys
from typing import Any

import bcrypt
import yaml

from kube import client as kube

PUSH_USER = "modelcache"  # the chart's dmcr.username default
PULL_USER = "puller"
# made and renewed by the controller (controller/dmcrtls.py, controller/registrytokens.py)
CONTROLLER_MADE = frozenset({"modelcache-dmcr-tls", "modelcache-dmcr-token"})
GENERATED = ("dmcr-htpasswd", "dmcr-credentials", "dmcr-pull-credentials",
             "modelcache-report-key", "modelcache-upload-admin-token")
COMPONENT = {"dmcr-htpasswd": "dmcr", "dmcr-credentials": "dmcr",
             "dmcr-pull-credentials": "dmcr", "modelcache-report-key": "controller",
             "modelcache-upload-admin-token": "upload-gateway"}

Obj = dict[str, Any]


class GenError(Exception):
    """What stops the generator: one line for the user, exit 1."""


def htpasswd_line(user: str, password: str) -> str:
    """One htpasswd entry, bcrypt (``$2b$``, which distribution's htpasswd accepts)."""
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}"


def _secret(name: str, namespace: str, data: dict[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": {
                "app.kubernetes.io/name": "modelcache",
                "app.kubernetes.io/component": COMPONENT[name]}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def manifests(namespace: str, existing: dict[str, dict[str, str]] | None = None) -> list[Obj]:
    """The Secrets to apply; ``existing`` (name → decoded data) are left out and kept."""
    have = existing or {}
    push = have.get("dmcr-credentials", {}).get("password")
    if "dmcr-htpasswd" in have and push is None:
        raise GenError("Secret dmcr-htpasswd exists but dmcr-credentials does not: its "
                       "password cannot be recovered from the hash; delete dmcr-htpasswd "
                       "(the registry's push user is then replaced) and run again")
    push = push or secrets.token_urlsafe(24)
    values = {
        "dmcr-htpasswd": lambda: {"htpasswd": htpasswd_line(PUSH_USER, push) + "\n"},
        "dmcr-credentials": lambda: {"username": PUSH_USER, "password": push},
        "dmcr-pull-credentials": lambda: {"username": PULL_USER,
                                          "password": secrets.token_urlsafe(24)},
        "modelcache-report-key": lambda: {"key": secrets.token_urlsafe(36)},
        "modelcache-upload-admin-token": lambda: {"token": secrets.token_urlsafe(36)},
    }
    return [_secret(name, namespace, values[name]()) for name in GENERATED if name not in have]


def read_existing(client: kube.Kube, namespace: str) -> dict[str, dict[str, str]]:
    """The generated Secrets already in ``namespace``, decoded (only dmcr-credentials'
    values are used; the others are kept as they are)."""
    out: dict[str, dict[str, str]] = {}
    for name in GENERATED:
        try:
            obj = client.get(kube.SECRETS, name, namespace)
        except kube.NotFound:
            continue
        out[name] = {k: base64.b64decode(v).decode(errors="replace")
                     for k, v in (obj.get("data") or {}).items()}
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("gen-secrets", help="print the Secrets daemonset/ mounts "
                       "(for kubectl apply -f -)")
    p.add_argument("--namespace", default="modelcache-system")
    p.add_argument("--keep-existing", action="store_true",
                   help="read the namespace and leave out the Secrets already there "
                        "(no rotation; safe to re-run)")
    p.add_argument("--kubeconfig", default=None,
                   help="with --keep-existing: else in-cluster, KUBECONFIG, ~/.kube/config")


def main(args: argparse.Namespace) -> int:
    try:
        existing: dict[str, dict[str, str]] = {}
        if args.keep_existing:
            client = kube.Kube.from_config(args.kubeconfig)
            try:
                existing = read_existing(client, args.namespace)
            except kube.ApiError as e:
                raise GenError(f"cannot read Secrets in {args.namespace}: {e}") from e
            finally:
                client.close()
        docs = manifests(args.namespace, existing)
    except GenError as e:
        sys.stderr.write(f"modelcache-controller gen-secrets: {e}\n")
        return 1
    for name in sorted(existing):
        sys.stderr.write(f"# kept: Secret {args.namespace}/{name} exists\n")
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False) if docs else "")
    return 0
