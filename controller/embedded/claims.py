"""The embedded runner's volumes: a PVC stands for a host directory per claim.

Where it sits: under ``jobrunner.JobRunner``, which plays the Job controller
and kubelet for the manager's Jobs on one machine. A Job's pod may mount a
``persistentVolumeClaim`` (the publish work volume, ``--publish-work-size``):
here a claim is a directory that every attempt of every pod of the namespace
shares, so a retried pod finds what the killed one left (what a real
provisioner gives). This class also plays the pvc-protection controller: a
deleted claim's directory is removed once no running pod uses it, and the
``kubernetes.io/pvc-protection`` finalizer the API server adds is let go.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading

from kube import client as kube

log = logging.getLogger(__name__)

PVC_PROTECTION = "kubernetes.io/pvc-protection"  # added by the API server's admission
RECLAIM_INTERVAL = 1.0  # seconds between looks at deleted claims


class Claims:
    """The PVCs of one namespace as host directories under ``root``."""

    def __init__(self, client: kube.Kube, namespace: str, root: str) -> None:
        self.client = client
        self.namespace = namespace
        self.root = root
        self._seen: set[str] = set()  # claims of the namespace seen at the last look
        self._thread: threading.Thread | None = None

    def dir(self, claim: str) -> str:
        return os.path.join(self.root, claim)

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._loop, args=(stop,), daemon=True,
                                        name="job-runner-claims")
        self._thread.start()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(RECLAIM_INTERVAL):
            try:
                self.reclaim()
            except Exception as e:  # the API server restarting: look again next time
                log.info("job runner: claim reclaim failed", extra={"error": str(e)[:200]})

    def reclaim(self) -> None:
        """Remove the directories of deleted claims no running pod uses; let them go."""
        claims, _ = self.client.list(kube.PVCS, self.namespace)
        names = {c["metadata"]["name"] for c in claims}
        for gone in self._seen - names:  # deleted outright (no finalizer)
            shutil.rmtree(self.dir(gone), ignore_errors=True)
        self._seen = names
        deleting = [c for c in claims if c["metadata"].get("deletionTimestamp")]
        if not deleting:
            return
        pods, _ = self.client.list(kube.PODS, self.namespace)
        in_use = {v["persistentVolumeClaim"]["claimName"] for p in pods
                  if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                  for v in (p.get("spec") or {}).get("volumes") or []
                  if "persistentVolumeClaim" in v}
        for c in deleting:
            name = c["metadata"]["name"]
            if name in in_use:
                continue
            shutil.rmtree(self.dir(name), ignore_errors=True)
            fins = c["metadata"].get("finalizers") or []
            if PVC_PROTECTION in fins:
                try:
                    self.client.patch(kube.PVCS, name, {"metadata": {
                        "finalizers": [f for f in fins if f != PVC_PROTECTION] or None}},
                        self.namespace)
                except kube.NotFound:
                    pass
