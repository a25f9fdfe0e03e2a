"""The one builder of the manager's Jobs: a batch/v1 Job of one container, by one recipe.

Where it sits: the publish Job (``models/publishjob.py``), the SharedPVC
materializer (``delivery/materializer.py``), the ``source.pvc`` reader
(``models/pvcsource.py``) and the ``spec.validation`` Job
(``models/validation.py``, a user's image and command) differ in what they
run, mount and carry; this module gives them the same frame. Every Job it makes:

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
  manager's informers and the report endpoint find both;
* gets its secrets (credentials, the report token, a source URL that may
  carry a presigned query) as files of one Secret mounted read-only at
  ``SECRETS_DIR`` (``secret_files``), each named to the worker by a
  ``VAR_FILE`` env var holding its path (read by ``jobs/secretfiles.py``):
  nothing secret in ``command``, ``args`` or ``env[].value``, where
  ``kubectl get job -o yaml``, the audit log and process listings show it.

Pure: a function of its arguments, returning the body to create.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from api import jobresult

Obj = dict[str, Any]

# a Secret of ``username``/``password`` keys → the registry login the Jobs' clients read
REGISTRY_LOGIN = (("MODELCACHE_REGISTRY_USERNAME", "username"),
                  ("MODELCACHE_REGISTRY_PASSWORD", "password"))

# the DMCR's CA bundle (controller/dmcrtls.py) as ``ca.crt`` of the Job's Secret: the
# worker gets its path in MODELCACHE_REGISTRY_CA_FILE and trusts it instead of plain HTTP
REGISTRY_CA = ("MODELCACHE_REGISTRY_CA", "ca.crt")

SECRETS_DIR = "/var/run/modelcache/secrets"  # where a Job's one Secret is mounted
SECRET_VOLUME = "secrets"
# owner root, group the pod's fsGroup: readable by the worker's group, by nobody else
SECRET_MODE = 0o440
WORKER_GID = 65532  # the worker image's user and group (Dockerfile.controller's USER)


@dataclass(frozen=True)
class SecretFiles:
    """A Job's secret material: ``secret``'s keys as files, each path in a ``VAR_FILE`` env var.

    ``keys``: (var, key) pairs. The whole Secret is mounted (no ``items``), so a
    key it lacks is a file that is absent, which the worker takes as unset.
    """

    secret: str
    keys: tuple[tuple[str, str], ...]

    def env(self) -> list[Obj]:
        return [{"name": f"{var}_FILE", "value": path(key)} for var, key in self.keys]

    def volume(self) -> Obj:
        return {"name": SECRET_VOLUME,
                "secret": {"secretName": self.secret, "defaultMode": SECRET_MODE}}

    def mount(self) -> Obj:
        return {"name": SECRET_VOLUME, "mountPath": SECRETS_DIR, "readOnly": True}


def path(key: str) -> str:
    """Where a key of the Job's Secret is seen inside the container."""
    return f"{SECRETS_DIR}/{key}"


def build(*, name: str, namespace: str, labels: Mapping[str, str],
          annotations: Mapping[str, str], container: str, image: str, command: list[str],
          env: list[Obj], mounts: list[Obj], volumes: list[Obj], backoff_limit: int,
          owners: list[Obj] | None = None, placement: Mapping[str, Any] | None = None,
          active_deadline: int | None = None, ttl_after_finished: int | None = None,
          service_account: str | None = None, read_only_root: bool = False,
          service_links: bool = True, fs_group: int | None = None,
          secret: SecretFiles | None = None, args: list[str] | None = None,
          message_policy: str = "File") -> Obj:
    """The Job body.

    ``placement``: a Model's ``spec.publish`` (``resources`` for the container,
    ``nodeSelector`` and ``tolerations`` for the pod). ``read_only_root`` and
    ``service_links=False`` narrow a pod that runs in a user's namespace further.
    ``fs_group``: the group a mounted PVC is made writable for (an ``emptyDir``
    is writable by anyone; a fresh volume's root is root's), chowned only when
    its root does not match yet, so a retried pod does not walk 100 GB again.
    ``secret``: the Job's secret material as mounted files (see the module doc);
    the pod's fsGroup becomes the worker's group, so the worker may read them.
    ``args``: the container's args (a user's validation command keeps its own split).
    ``message_policy``: ``FallbackToLogsOnError`` for a user's command that writes no
    result document: the kubelet then puts the tail of its log in the termination message.
    """
    placement = placement or {}
    if secret is not None:
        env = [*env, *secret.env()]
        mounts = [*mounts, secret.mount()]
        volumes = [*volumes, secret.volume()]
        fs_group = WORKER_GID if fs_group is None else fs_group
    security: Obj = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if read_only_root:
        security["readOnlyRootFilesystem"] = True
    box: Obj = {
        "name": container, "image": image, "command": command, "env": env,
        "volumeMounts": mounts,
        "terminationMessagePath": jobresult.TERMINATION_LOG,
        "terminationMessagePolicy": message_policy,
        "securityContext": security,
    }
    if args:
        box["args"] = list(args)
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


__all__ = ["REGISTRY_CA", "REGISTRY_LOGIN", "SECRETS_DIR", "SECRET_MODE", "WORKER_GID", "SecretFiles",
           "build", "path"]
