"""The file resolver: names to references from ``--models-file``.

Implements ``csi.resolvers.base.Resolver`` for standalone nodes, tests and
csi-sanity: ``{models: {ns/name: ref}, clusterModels: {name: ref}}`` in
JSON or YAML, each value a reference string or ``{reference, pin}``. The
file is re-read whenever its mtime, size or inode changes; a file that
does not parse keeps the last good one serving. A ``model`` is looked up
under the pod's own namespace only.

A volume's pinned ``digest`` must belong to that model: the node cache is
keyed by digest alone, so without a check a pod could name its own model,
pin another namespace's digest and be shown that tree from the cache. When
the file maps the model to a digest, a pin must equal it; when it maps to a
tag, the pin is confirmed in the model's own repository (one manifest GET,
remembered), and without a registry client it is refused.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import yaml

from csi import errors
from csi.resolvers.base import Resolved, Volume
from modelpack.errors import ModelPackError, NotFoundError
from modelpack.oci import reference
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)


def _entry(name: str, value: Any) -> Resolved:
    pin = False
    if isinstance(value, dict):
        pin = bool(value.get("pin", False))
        value = value.get("reference") or value.get("ref")
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a reference string or {{reference, pin}}")
    return Resolved(reference.parse(value), pin)


class FileResolver:
    """Names to references from a JSON/YAML file; re-read when it changes."""

    def __init__(self, path: str,
                 client_for: Callable[[str], RegistryClient] | None = None) -> None:
        self.path = path
        self.client_for = client_for
        self._confirmed: set[str] = set()  # "<repository>@<digest>" found in the registry
        self._lock = threading.Lock()
        self._sig: tuple[int, int, int] | None = None
        self._models: dict[str, Resolved] = {}
        self._cluster: dict[str, Resolved] = {}

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise errors.unavailable(f"models file {self.path} does not exist") from None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig == self._sig:
            return
        with open(self.path) as f:
            text = f.read()
        try:
            doc = yaml.safe_load(text) or {}  # YAML is a superset of JSON
            models = {str(k): _entry(str(k), v) for k, v in (doc.get("models") or {}).items()}
            cluster = {str(k): _entry(str(k), v)
                       for k, v in (doc.get("clusterModels") or {}).items()}
        except (yaml.YAMLError, ValueError, AttributeError, ModelPackError) as e:
            # keep serving the last good file; a half-edited file must not drop every model
            log.error("models file unreadable; keeping the previous one",
                      extra={"path": self.path, "error": str(e)[:300]})
            if self._sig is None:
                raise errors.unavailable(f"models file {self.path} is invalid: {e}") from e
            return
        self._models, self._cluster, self._sig = models, cluster, sig
        log.info("models file loaded", extra={"path": self.path, "models": len(models),
                                              "clusterModels": len(cluster)})

    def resolve(self, volume: Volume) -> Resolved:
        with self._lock:
            self._reload()
            if volume.cluster_model:
                found = self._cluster.get(volume.cluster_model)
            elif volume.model_namespace:
                found = None  # the file knows no grants (api.sharing): no shared Model
            else:
                found = self._models.get(f"{volume.namespace}/{volume.model}")
        if found is None:
            raise errors.not_found(f"{volume.what} not found")
        if volume.digest and volume.digest != found.reference.digest:
            ref = found.reference.with_digest(volume.digest)
            self._confirm_pinned(ref, volume, mapped=found.reference.digest is not None)
            return Resolved(ref, found.pin)
        return found

    def _confirm_pinned(self, ref: Reference, volume: Volume, *, mapped: bool) -> None:
        """Is a pinned digest an artifact of this model's own repository? Raises if not."""
        refused = errors.not_found(f"{ref.digest} is not an artifact of {volume.what} (a "
                                   "pinned digest must be the model's own)")
        if mapped or self.client_for is None:
            raise refused  # the file names this model's one digest, or nothing can confirm
        with self._lock:
            if str(ref) in self._confirmed:
                return
        try:
            self.client_for(ref.host).get_manifest(ref)
        except NotFoundError:
            raise refused from None
        with self._lock:
            self._confirmed.add(str(ref))
