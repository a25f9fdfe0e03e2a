"""``modelcache upload``: local files into a Model's upload session (``source.upload``).

The session comes from the Model itself: its ``status.upload`` (URL,
``expiresAt``) and the token Secret it names (``tokenSecretRef``, key
``token``, in the Model's namespace), read through the kubeconfig. Where the
user may not read them, ``--url`` and ``--token-file`` give the session by
hand. The resumable protocol (HEAD for the offset, ``Content-Range`` pieces,
retry after a cut) is ``jobs/upload_client.py``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import os
from dataclasses import dataclass

from api import model, names
from cli import cluster
from cli.errors import CommandError, UsageError
from cli.progress import open_bar
from jobs.upload_client import UploadError, upload
from kube import client as kube


@dataclass(frozen=True)
class Session:
    url: str
    token: str


def _expired(expires_at: str) -> bool:
    try:
        when = datetime.datetime.strptime(expires_at, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return False  # unreadable: let the gateway judge the token
    return when.replace(tzinfo=datetime.UTC) <= datetime.datetime.now(datetime.UTC)


def session_of(view: model.ModelView) -> tuple[str, str]:
    """(url, token Secret name) of an open session; ``CommandError`` saying why there is none."""
    where = view.full_name
    source = view.spec.get("source")
    if not isinstance(source, dict) or "upload" not in source:
        kinds = ", ".join(sorted(source)) if isinstance(source, dict) else "none"
        raise CommandError(f"Model {where} has no upload source (spec.source: {kinds}); "
                           "only a Model with spec.source.upload takes files",
                           reason="NotAnUploadSource")
    url = str(view.upload.get("url") or "")
    ref = view.upload.get("tokenSecretRef")
    secret = str(ref.get("name") or "") if isinstance(ref, dict) else ""
    if url and secret:
        expires = str(view.upload.get("expiresAt") or "")
        if expires and _expired(expires):
            raise CommandError(f"the upload session of Model {where} expired at {expires}; "
                               "the controller opens a new one within seconds: run again",
                               reason="SessionExpired")
        return url, secret
    if view.phase == "Ready" and view.digest:
        raise CommandError(f"Model {where} is Ready ({view.digest}) and waits for no upload; "
                           "its session closed when the upload was published",
                           reason="NotAcceptingUploads")
    ready = view.condition("Ready") or {}
    why = f"{ready.get('reason')}: {str(ready.get('message'))[:300]}" if ready else \
        "the controller has not written a status yet"
    raise CommandError(f"Model {where} is not accepting uploads yet (phase "
                       f"{view.phase or 'none'}; {why}); it does once its phase is "
                       "WaitForUpload", reason="NotAcceptingUploads")


def read_token(client: kube.Kube, namespace: str, secret: str) -> str:
    try:
        obj = client.get(kube.SECRETS, secret, namespace)
    except kube.ApiError as e:
        if e.status in (401, 403):
            raise UsageError(f"may not read Secret {namespace}/{secret} (HTTP {e.status}); ask "
                             "for the session and give --url URL --token-file FILE",
                             reason="TokenUnreadable") from e
        raise CommandError(f"reading Secret {namespace}/{secret}: {e}", reason="ApiError") from e
    try:
        token = base64.b64decode((obj.get("data") or {})[names.UPLOAD_TOKEN_KEY]).decode().strip()
    except (KeyError, TypeError, binascii.Error, UnicodeDecodeError) as e:
        raise CommandError(f"Secret {namespace}/{secret} holds no key "
                           f"{names.UPLOAD_TOKEN_KEY!r}", reason="TokenUnreadable") from e
    if not token:
        raise CommandError(f"Secret {namespace}/{secret} holds an empty token",
                           reason="TokenUnreadable")
    return token


def find_session(args: argparse.Namespace) -> Session:
    """The session from ``--url``/``--token-file``, else from the Model through the kubeconfig."""
    if args.url:
        token = os.environ.get("MODELCACHE_UPLOAD_TOKEN", "")
        if args.token_file:
            with open(args.token_file) as f:
                token = f.read().strip()
        if not token:
            raise UsageError("--url needs the session token: --token-file FILE or "
                             "MODELCACHE_UPLOAD_TOKEN", reason="MissingUploadToken")
        return Session(args.url, token)
    if args.token_file:
        raise UsageError("--token-file goes with --url", reason="MissingUploadSession")
    client = cluster.connect(args.kubeconfig)
    try:
        ns = args.namespace or cluster.default_namespace(args.kubeconfig)
        view = model.ModelView.of(cluster.get_model(client, args.model, ns))
        url, secret = session_of(view)
        return Session(url, read_token(client, ns, secret))
    finally:
        client.close()


def cmd_upload(args: argparse.Namespace) -> int:
    session = find_session(args)
    try:
        with open_bar(f"upload {args.model}", args.progress) as (update, set_total):
            state = {"done": 0, "total": 0}

            def progress(done: int, total: int) -> None:
                if total != state["total"]:
                    state["total"] = total
                    set_total(total)
                update(done - state["done"])
                state["done"] = done

            status = upload(session.url, session.token, args.path, progress=progress)
    except UploadError as e:
        raise CommandError(str(e), reason=e.reason) from e
    print(f"uploaded {args.path} to {args.model}: {status.get('phase')}")
    if status.get("result"):
        print(f"digest: {status['result'].get('digest')}")
    return 0
