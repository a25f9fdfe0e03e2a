"""A FAKE kubelet (and Job controller) for tests: there is no kubelet here.

The test API server runs without kube-controller-manager or any node, so
nothing would ever turn a Job into a running process. ``FakeKubelet`` plays
both parts for every Job of the namespace it is given. It is the embedded
mode's Job executor (``controller/embedded/jobrunner.py``, which documents
the Job controller's and the kubelet's parts it plays) with two changes:

* it takes every Job, not only the manager's: the tests' own workloads run
  too, and so do the Jobs the manager makes in users' namespaces.

``persistentVolumeClaim`` volumes are the runner's: one directory per claim
(``claim_dir``, shared by every pod of the namespace and kept across
attempts; ``subPath`` honoured, read-only not enforced): no provisioner and
no binding, a test fills or inspects the directory itself; a deleted claim
no pod uses has its directory removed and its pvc-protection finalizer
dropped.

Stated shortcuts, as the runner's: the image is not pulled (a command whose
first word is ``modelcache-controller`` runs as ``python -m controller.main``
of this checkout); ``emptyDir`` mounts and ``terminationMessagePath`` are
temp dirs/files, rewritten in args and env values; no resources,
nodeSelector or tolerations are enforced. A deleted Job's process is killed.
``hold()`` makes new attempts wait until ``release()``, so a test can act
while a Job is "running"; ``runs`` lists every finished attempt.

The tests' sources are loopback servers, so every pod gets
``MODELCACHE_ALLOW_PRIVATE_SOURCES=1`` (the publish Job's deny list off)
unless ``deny_private_sources=True``: the attack tests keep it on.
"""

from __future__ import annotations

import tempfile

from controller.embedded import jobrunner
from kube import client as kube


class FakeKubelet(jobrunner.JobRunner):
    def __init__(self, client: kube.Kube, namespace: str, *, work_root: str | None = None,
                 base_env: dict[str, str] | None = None,
                 deny_private_sources: bool = False) -> None:
        env = {} if deny_private_sources else {"MODELCACHE_ALLOW_PRIVATE_SOURCES": "1"}
        super().__init__(client, namespace,
                         work_root=work_root or tempfile.mkdtemp(prefix="fake-kubelet-"),
                         base_env={**env, **(base_env or {})}, label_selector=None)
