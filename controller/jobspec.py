"""The one builder of the manager's Jobs: a batch/v1 Job of one container, by one recipe.

Where it sits: the publish Job (``models/publishjob.py``), the SharedPVC
materializer (``delivery/materializer.py``) and the ``source.pvc`` reader
(``models/pvcsource.py``) differ in what they run, mount and carry; this
module gives them the same frame. Every Job it makes:

* runs once per attempt (``restartPolicy: Never``), up to ``backoffLimit``
  attempts, and fails at once on the Job result protocol's terminal exit
  code (``podFailurePolicy`` ``FailJob`` on ``jobresult.TERMINAL``): no
  retry can cure a corrupt blob or a missing path, while 75 retries;
* writes its result to the termination message (``jobresult.TERMINATION_LOG``,
  policy ``File``), where the manager reads it (``jobresult.read``);
* has no service-account token, no privilege escalation and no
  capabilities: the pods talk to a registry, a gateway and the manager's
  report endpoint, never to the API server;
* carries the same labels on the Job and on its pod template, so the
  manager's informers and the report endpoint find both.

Pure: a function of its arguments, returning the body to create.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from api import jobresult

Obj = dict[str, Any]

# a Secret of ``username``/``password`` keys → the registry login the Jobs' clients read
REGISTRY_LOGIN = (("MODELCACHE_REGISTRY_USERNAME", "username"),
                  ("MODELCACHE_REGISTRY_PASSWORD", "password"))


def secret_env(secret: str, keys: Iterable[tuple[str, str]],
               optional: Collection[str] = ()) -> list[Obj]:
    """Env vars from ``secret``'s keys, as (var, key) pairs; vars in ``optional`` may be absent."""
    out = []
    for var, key in keys:
        ref: Obj = {"name": secret, "key": key}
        if var in optional:
            ref["optional"] = True
        out.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return out


def build(*, name: str, namespace: str, labels: Mapping[str, str],
          annotations: Mapping[str, str], container: str, image: str, command: list[str],
          env: list[Obj], mounts: list[Obj], volumes: list[Obj], backoff_limit: int,
          owners: list[Obj] | None = None, placement: Mapping[str, Any] | None = None,
          active_deadline: int | None = None, ttl_after_finished: int | None = None,
          service_account: str | None = None, read_only_root: bool = False,
          service_links: bool = True, fs_group: int | None = None) -> Obj:
    """The Job body.

    ``placement``: a Model's ``spec.publish`` (``resources`` for the container,
    ``nodeSelector`` and ``tolerations`` for the pod). ``read_only_root`` and
    ``service_links=False`` narrow a pod that runs in a user's namespace further.
    ``fs_group``: the group a mounted PVC is made writable for (an ``emptyDir``
    is writable by anyone; a fresh volume's root is root's), chowned only when
    its root does not match yet, so a retried pod does not walk 100 GB again.
    """
    placement = placement or {}
    security: Obj = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if read_only_root:
        security["readOnlyRootFilesystem"] = True
    box: Obj = {
        "name": container, "image": image, "command": command, "env": env,
        "volumeMounts": mounts,
        "terminationMessagePath": jobresult.TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": security,
    }
    if placement.get("resources"):
        box["resources"] = placement["resources"]
    pod: Obj = {"restartPolicy": "Never", "automountServiceAccountToken": False}
    if not service_links:
        pod["enableServiceLinks"] = False
    if fs_group is not None:
        pod["securityContext"] = {"fsGroup": fs_group, "fsGroupChangePolicy": "OnRootMismatch"}
    pod.update(containers=[box], volumes=volumes)
    if service_account:
        pod["serviceAccountName"] = service_account
    for key in ("nodeSelector", "tolerations"):
        if placement.get(key):
            pod[key] = placement[key]
    spec: Obj = {
        "backoffLimit": backoff_limit,
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": container, "operator": "In", "values": [jobresult.TERMINAL]}}]},
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
    }
    if active_deadline:
        spec["activeDeadlineSeconds"] = active_deadline
    if ttl_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = ttl_after_finished
    meta: Obj = {"name": name, "namespace": namespace, "labels": dict(labels),
                 "annotations": dict(annotations)}
    if owners:
        meta["ownerReferences"] = owners
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


__all__ = ["REGISTRY_LOGIN", "build", "secret_env"]
