"""Air-gap bundles of ClusterModels: ``modelcache export`` and ``modelcache import``.

Where it sits: the Kubernetes side of a bundle, on top of the format in
``modelpack/oci/bundle.py`` (layout, verification, push) and
``modelpack/oci/bundle_export.py`` (writing). Export reads a Ready
ClusterModel from the API server and its artifact from the cluster registry
(DMCR) and writes the bundle with the CR as its document
(``clustermodel.yaml``). Import verifies a bundle, checks that its CR names
the same model and digest, dry-runs the apply, pushes the model to the other
cluster's DMCR at the repository the controller uses for that model
(``api.model.repository``) and applies the CR with the annotation
``modelcache.io/imported-digest``, which makes the controller adopt the
pushed artifact (controller/models/adopt.py) instead of publishing from a
source the air-gapped cluster cannot reach. A bundle refused at any step
leaves both the registry and the cluster untouched.

The CR that travels holds apiVersion, kind, metadata (name, labels,
annotations) and spec; annotation modelcache.io/imported-digest = the
manifest digest.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import yaml

from api import model, names
from cli import access, cluster
from cli.errors import UsageError
from cli.progress import bar
from kube import client as kube
from modelpack.oci import bundle as oci_bundle
from modelpack.oci import bundle_export
from modelpack.oci.manifest import ModelPack
from modelpack.oci.reference import Reference
from modelpack.oci.registry import Progress, RegistryClient

log = logging.getLogger(__name__)

BundleError = oci_bundle.BundleError
KIND = model.CLUSTER_MODEL
CR_FILE = "clustermodel.yaml"
FIELD_MANAGER = "modelcache-import"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# what leaves the source cluster of a CR's metadata: never its identity or history
DROP_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration", names.REIMPORT,
                    names.UPSTREAM)


def _noop(_: int) -> None:
    pass


# --- export --------------------------------------------------------------------------


def ready_cluster_model(client: kube.Kube, name: str) -> dict[str, Any]:
    """The ClusterModel ``name``; it must serve an artifact (Ready, or republishing)."""
    try:
        obj = client.get(kube.CLUSTER_MODELS, name)
    except kube.NotFound as e:
        namespaced = namespaced_models(client, name)
        if namespaced:
            raise BundleError(
                f"export takes a ClusterModel; Model {namespaced[0]} is namespaced and there "
                f"is no ClusterModel {name.rsplit('/', 1)[-1]}. A bundle carries a "
                "ClusterModel: create one with the same spec (kind: ClusterModel, no "
                "namespace), let it publish (the same files give the same digest), then "
                "export it", reason="NamespacedModel") from e
        raise BundleError(f"ClusterModel {name} not found", reason="NotFound") from e
    except kube.ApiError as e:
        raise BundleError(f"reading ClusterModel {name}: {e}", reason="ApiError") from e
    view = model.ModelView.of(obj)
    if not view.servable_digest:
        raise BundleError(f"ClusterModel {name} is {view.phase or 'not published'}, "
                          "not Ready: only a published model can be exported",
                          reason="NotReady")
    return obj


def namespaced_models(client: kube.Kube, name: str) -> list[str]:
    """``ns/name`` of the Models that ``name`` (or ``ns/name``) may mean; [] if unreadable."""
    ns, _, short = name.rpartition("/")
    try:
        if ns:
            client.get(kube.MODELS, short, ns)
            return [f"{ns}/{short}"]
        items, _ = client.list(kube.MODELS, field_selector=f"metadata.name={short}")
    except kube.ApiError:  # not found, or not allowed to list across namespaces
        return []
    return sorted(model.ModelView.of(o).full_name for o in items)


def registry_host(obj: dict[str, Any]) -> str | None:
    """The registry host in the model's ``status.artifact.reference``, if any."""
    ref = model.ModelView.of(obj).reference
    return ref.split("/", 1)[0] if "/" in ref else None


def bundle_cr(obj: dict[str, Any], digest: str) -> dict[str, Any]:
    """The CR that travels: its name, labels, annotations and spec; never status or uid."""
    meta = obj["metadata"]
    ann = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in DROP_ANNOTATIONS}
    ann[names.IMPORTED] = digest
    revision = model.ModelView.of(obj).resolved_revision
    if revision:
        ann[names.IMPORTED_REVISION] = revision
    out_meta: dict[str, Any] = {"name": meta["name"], "annotations": ann}
    if meta.get("labels"):
        out_meta["labels"] = dict(meta["labels"])
    return {"apiVersion": names.API_VERSION, "kind": KIND, "metadata": out_meta,
            "spec": obj.get("spec") or {}}


def export_bundle(obj: dict[str, Any], client: RegistryClient, output: str,
                  progress: Progress = _noop, fetchers: int = 3) -> bundle_export.Exported:
    """Write the bundle of Ready ClusterModel ``obj`` (its artifact read from ``client``)."""
    # the servable artifact (the last verified one, also while a re-publish runs) is
    # fetched by this digest and verified against it: the CR's is the same
    digest = model.ModelView.of(obj).servable_digest
    cr = yaml.safe_dump(bundle_cr(obj, digest), sort_keys=True,
                        default_flow_style=False).encode()
    return bundle_export.export(client, model.repository(dict(obj, kind=KIND)), digest, output,
                                ref_name=str(obj["metadata"]["name"]), document=(CR_FILE, cr),
                                progress=progress, fetchers=fetchers)


# --- import: verification ------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A verified bundle and the ClusterModel it carries."""

    verified: oci_bundle.Bundle
    cr: dict[str, Any]

    @property
    def path(self) -> str:
        return self.verified.path

    @property
    def pack(self) -> ModelPack:
        return self.verified.pack

    @property
    def blobs(self) -> dict[str, oci_bundle.Entry]:
        return self.verified.blobs

    @property
    def name(self) -> str:
        return str(self.cr["metadata"]["name"])

    @property
    def digest(self) -> str:
        return self.verified.digest


def _check_cr(document: bytes, ref_name: str | None, digest: str) -> dict[str, Any]:
    try:
        cr = yaml.safe_load(document)
    except yaml.YAMLError as e:
        raise BundleError(f"{CR_FILE} is not YAML: {str(e)[:200]}", reason="InvalidBundle") from e
    if not isinstance(cr, dict) or cr.get("apiVersion") != names.API_VERSION or cr.get("kind") != KIND:
        raise BundleError(f"{CR_FILE} is not a {names.API_VERSION} {KIND}", reason="InvalidBundle")
    extra = set(cr) - {"apiVersion", "kind", "metadata", "spec"}
    md = cr.get("metadata")
    if extra or not isinstance(md, dict) or not isinstance(cr.get("spec"), dict) \
            or set(md) - {"name", "labels", "annotations"}:
        raise BundleError(f"{CR_FILE} may hold only apiVersion, kind, metadata (name, labels, "
                          "annotations) and spec", reason="InvalidBundle")
    name = md.get("name")
    if not isinstance(name, str) or len(name) > 63 or not NAME_RE.match(name):
        raise BundleError(f"{CR_FILE} names no valid ClusterModel ({str(name)[:80]!r})",
                          reason="InvalidBundle")
    if name != ref_name:
        raise BundleError(f"{CR_FILE} names {name!r} but the manifest is tagged {ref_name!r}",
                          reason="BundleMismatch")
    ann = md.get("annotations") or {}
    if not isinstance(ann, dict) or ann.get(names.IMPORTED) != digest:
        got = ann.get(names.IMPORTED) if isinstance(ann, dict) else None
        raise BundleError(f"{CR_FILE} records digest {got!r}, the manifest is {digest}",
                          reason="BundleMismatch")
    return cr


def _warm_kube_client() -> None:
    """Import the Kubernetes client package in the background.

    An import's next step (``connect``, the dry-run apply) needs it, and its
    import costs ~0.2 s of CPU; while ``verify`` waits on the disk and on
    hashlib (both without the GIL) that time is free. Import locks make a
    later import in the main thread wait for this one, never run it twice.
    """
    def run() -> None:
        try:
            import kubernetes.client  # noqa: F401
        except Exception as e:  # the main thread's own import reports a real problem
            log.debug("kubernetes client not preloaded", extra={"error": str(e)[:200]})

    threading.Thread(target=run, name="bundle-warm-kube", daemon=True).start()


def verify(path: str, progress: Progress = _noop) -> Bundle:
    """Verify a bundle and its CR completely, reading it once; ``BundleError`` with a reason."""
    if "kubernetes.client" not in sys.modules:
        _warm_kube_client()
    verified = oci_bundle.verify(path, CR_FILE, progress)
    return Bundle(verified, _check_cr(verified.document, verified.ref_name, verified.digest))


# --- import: push and apply ----------------------------------------------------------


def push(bundle: Bundle, client: RegistryClient, repository: str,
         progress: Progress = _noop, workers: int = 4) -> str:
    """Push the model, manifest last, tagged as an import (``names.imported_tag``)."""
    return oci_bundle.push(bundle.verified, client, repository,
                           names.imported_tag(bundle.digest), progress, workers)


def apply(client: kube.Kube, cr: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    """Server-side apply of the bundle's CR (a dry run validates it without a change)."""
    name = str(cr["metadata"]["name"])
    try:
        return client.request("PATCH", kube.CLUSTER_MODELS.path(None, name), body=cr,
                              content_type="application/apply-patch+yaml",
                              query={"fieldManager": FIELD_MANAGER, "force": True,
                                     "dryRun": "All" if dry_run else None})
    except kube.ApiError as e:
        raise BundleError(f"applying ClusterModel {name}: {e}", reason="ApplyFailed") from e


def repository(bundle: Bundle) -> str:
    return model.repository(dict(bundle.cr, kind=KIND))


connect = cluster.connect


def import_registry(flag: str | None, client: kube.Kube) -> str:
    """Where ``import`` pushes: ``--registry``, else ``$MODELCACHE_REGISTRY``, else the
    registry this cluster's ClusterModels are published to; ``UsageError`` when none."""
    host = flag or os.environ.get("MODELCACHE_REGISTRY")
    if host:
        return host
    try:
        hosts = cluster.registry_hosts(client)
    except kube.ApiError as e:
        hosts, why = [], f"listing ClusterModels failed: {str(e)[:200]}"
    else:
        why = "no ClusterModel in this cluster names its registry (status.artifact.reference)"
    if hosts:
        log.info("registry from the cluster's ClusterModels", extra={"registry": hosts[0]})
        return hosts[0]
    raise UsageError(f"no registry to push to: no --registry, no MODELCACHE_REGISTRY, and "
                     f"{why}; give --registry HOST:PORT (the cluster registry, DMCR, as "
                     "reachable from here, e.g. a port-forward to its port 5000)",
                     reason="MissingRegistry")


def wait_ready(client: kube.Kube, name: str, digest: str, timeout: float) -> dict[str, Any]:
    """Wait until the controller reports ClusterModel ``name`` Ready with ``digest``."""
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            obj = client.get(kube.CLUSTER_MODELS, name)
        except kube.ApiError as e:
            log.info("waiting for the ClusterModel", extra={"error": str(e)[:200]})
        view = model.ModelView.of(obj)
        if view.phase == "Ready" and view.digest == digest:
            return dict(obj.get("status") or {})
        if view.phase == "Failed":
            ready = view.condition("Ready") or {}
            raise BundleError(f"ClusterModel {name} Failed: {ready.get('message')}",
                              reason=str(ready.get("reason") or "Failed"))
        time.sleep(1.0)
    raise BundleError(f"ClusterModel {name} not Ready with {digest} after {timeout:.0f}s "
                      f"(phase {model.ModelView.of(obj).phase or None})", reason="Timeout")


# --- the commands ----------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    kc = connect(args.kubeconfig)
    try:
        obj = ready_cluster_model(kc, args.name)
    finally:
        kc.close()
    host = args.registry or registry_host(obj)
    if not host:
        raise UsageError("the model's status names no registry; give --registry HOST:PORT",
                         reason="MissingRegistry")
    client = access.client(args, Reference(host, "x"))
    t0 = time.monotonic()
    with bar(model.ModelView.of(obj).size, "export", args.progress) as progress:
        res = export_bundle(obj, client, args.output, progress)
    dt = time.monotonic() - t0
    rate = res.model_bytes / dt / 1e6 if dt > 0 else 0.0
    print(f"exported ClusterModel {args.name}: {res.blobs} blobs, {res.model_bytes} bytes "
          f"in {dt:.2f}s ({rate:.0f} MB/s)")
    print(f"digest: {res.digest}")
    print(f"bundle: {res.path} ({res.bundle_bytes} bytes, {res.sha256})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    kc = connect(args.kubeconfig)
    try:
        # what is missing is said before the bundle is read (minutes for a large one)
        registry = import_registry(args.registry, kc)
        with bar(os.path.getsize(args.bundle), "verify", args.progress) as progress:
            b = verify(args.bundle, progress)
        apply(kc, b.cr, dry_run=True)  # a CR this cluster refuses stops before a push
        client = access.client(args, Reference(registry, "x"))
        with bar(sum(e.size for e in b.blobs.values()), "push", args.progress) as progress:
            ref = push(b, client, repository(b), progress, args.jobs)
        apply(kc, b.cr)
        dt = time.monotonic() - t0
        rate = b.pack.size / dt / 1e6 if dt > 0 else 0.0
        print(f"imported ClusterModel {b.name}: {len(b.pack.layers)} files, {b.pack.size} bytes "
              f"verified and pushed in {dt:.2f}s ({rate:.0f} MB/s)")
        print(f"digest: {b.digest}")
        print(f"pushed: {ref}")
        if args.wait:
            wait_ready(kc, b.name, b.digest, args.wait)
            print(f"ready: ClusterModel {b.name}")
        else:
            print(f"applied: ClusterModel {b.name} (the controller adopts the artifact)")
    finally:
        kc.close()
    return 0
