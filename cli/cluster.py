"""The commands' way into a cluster: a kubeconfig, a namespace, and a Model by name.

Where it sits: under ``upload.py`` and ``bundle.py``, on the ``kube/``
toolkit (never the controller). The kubeconfig is ``--kubeconfig``, else the
in-cluster account, else ``$KUBECONFIG`` or ``~/.kube/config``; the
namespace is ``-n``, else the kubeconfig context's, else ``default``.
"""

from __future__ import annotations

import os
from typing import Any

from api import model
from cli.errors import CommandError, UsageError
from kube import client as kube


def connect(kubeconfig: str | None) -> kube.Kube:
    """An API client; ``UsageError`` (exit 2) when there is no kubeconfig to use."""
    try:
        return kube.Kube.from_config(kubeconfig)
    except Exception as e:  # the kubernetes package's config errors share no base class
        raise UsageError(f"cannot load a kubeconfig ({str(e)[:300]}); give --kubeconfig FILE "
                         "or set KUBECONFIG", reason="KubeconfigError") from e


def default_namespace(kubeconfig: str | None) -> str:
    """The current context's namespace, else ``default`` (as kubectl does)."""
    from kubernetes import config  # only when no -n was given

    try:
        _, active = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig or os.environ.get("KUBECONFIG") or None)
    except Exception:  # in-cluster, or no file: kubectl's default too
        return "default"
    ns = ((active or {}).get("context") or {}).get("namespace")
    return str(ns) if ns else "default"


def get_model(client: kube.Kube, name: str, namespace: str) -> dict[str, Any]:
    """Model ``namespace/name`` for ``upload``; a missing or forbidden one names the way
    forward."""
    try:
        return client.get(kube.MODELS, name, namespace)
    except kube.NotFound as e:
        hint = ""
        try:
            client.get(kube.CLUSTER_MODELS, name)
            hint = f"; ClusterModel {name} exists, but this command takes a Model"
        except kube.ApiError:
            pass
        raise CommandError(f"Model {namespace}/{name} not found (give -n NAMESPACE){hint}",
                           reason="NotFound") from e
    except kube.ApiError as e:
        if e.status in (401, 403):
            raise UsageError(f"may not read Model {namespace}/{name} (HTTP {e.status}); ask "
                             "for the session and give --url URL --token-file FILE",
                             reason="ModelUnreadable") from e
        raise CommandError(f"reading Model {namespace}/{name}: {e}", reason="ApiError") from e


def registry_hosts(client: kube.Kube) -> list[str]:
    """The registry hosts this cluster's ClusterModels are published to, most used first."""
    items, _ = client.list(kube.CLUSTER_MODELS)
    count: dict[str, int] = {}
    for obj in items:
        ref = model.ModelView.of(obj).reference
        if "/" in ref:
            host = ref.split("/", 1)[0]
            count[host] = count.get(host, 0) + 1
    return sorted(count, key=lambda h: (-count[h], h))
