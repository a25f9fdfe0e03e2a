"""A thin JSON client for the API server, on the ``kubernetes`` package's transport.

The generated ``kubernetes`` API classes turn every object into model
instances (slow for thousands of objects, and lossy for custom resources);
here every call sends and returns plain dicts over the same authenticated
connection pool (kubeconfig or in-cluster credentials, token refresh
included). Errors leave as ``ApiError`` and its subclasses, raised
``from`` the transport's exception, so no ``urllib3``/``kubernetes``
exception type escapes this module.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """An API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFound(ApiError):
    pass


class ConfigError(ValueError):
    """No usable credentials: no kubeconfig, and not in a pod (the message names the file
    or the missing variable, never a credential)."""


class Conflict(ApiError):
    """409: a resourceVersion precondition failed or the name is taken."""


class Gone(ApiError):
    """410: a watch's resourceVersion is too old; list again."""


def brief(e: BaseException) -> str:
    """A short description of a failed call for logs and answers: the HTTP status and
    reason when the server answered, else the error's type and the start of its text."""
    status = getattr(e, "status", None)
    if status:
        return f"HTTP {status} {getattr(e, 'reason', '') or ''}".strip()
    return f"{type(e).__name__}: {str(e)[:200]}"


def _error(status: int, body: bytes | str | None, what: str) -> ApiError:
    reason, message = "", ""
    try:
        doc = json.loads(body or b"{}")
        reason, message = str(doc.get("reason", "")), str(doc.get("message", ""))
    except (ValueError, AttributeError):
        message = (body.decode(errors="replace") if isinstance(body, bytes) else str(body or ""))
    text = f"{what}: {status} {reason}: {message[:500]}"
    cls = {404: NotFound, 409: Conflict, 410: Gone}.get(status, ApiError)
    if status == 409 and reason == "AlreadyExists":
        cls = Conflict
    return cls(text, status=status, reason=reason)


@dataclass(frozen=True)
class Resource:
    """One API resource: ``group``/``version``/``plural``, namespaced or not."""

    group: str
    version: str
    plural: str
    namespaced: bool = True
    kind: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        if sub:
            base += f"/{sub}"
        return base


MODELS = Resource("modelcache.io", "v1alpha1", "models", True, "Model")
CLUSTER_MODELS = Resource("modelcache.io", "v1alpha1", "clustermodels", False, "ClusterModel")
JOBS = Resource("batch", "v1", "jobs", True, "Job")
PODS = Resource("", "v1", "pods", True, "Pod")
SECRETS = Resource("", "v1", "secrets", True, "Secret")
CONFIGMAPS = Resource("", "v1", "configmaps", True, "ConfigMap")  # the DMCR's CA bundle
EVENTS = Resource("", "v1", "events", True, "Event")
LEASES = Resource("coordination.k8s.io", "v1", "leases", True, "Lease")
# workload delivery: the kinds the webhook injects into, and the SharedPVC claims
PVCS = Resource("", "v1", "persistentvolumeclaims", True, "PersistentVolumeClaim")
NODES = Resource("", "v1", "nodes", False, "Node")  # the gate lifter reads cache labels
DEPLOYMENTS = Resource("apps", "v1", "deployments", True, "Deployment")
STATEFULSETS = Resource("apps", "v1", "statefulsets", True, "StatefulSet")
DAEMONSETS = Resource("apps", "v1", "daemonsets", True, "DaemonSet")
CRONJOBS = Resource("batch", "v1", "cronjobs", True, "CronJob")
MODEL_CATALOG_SOURCES = Resource("modelcache.io", "v1alpha1", "modelcatalogsources", False,
                                 "ModelCatalogSource")
TOKEN_REVIEWS = Resource("authentication.k8s.io", "v1", "tokenreviews", False, "TokenReview")
SUBJECT_ACCESS_REVIEWS = Resource("authorization.k8s.io", "v1", "subjectaccessreviews", False,
                                  "SubjectAccessReview")


class Kube:
    """Dict-in, dict-out calls over one ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any, timeout: float = 30.0) -> None:
        self.api = api_client
        self.timeout = timeout

    @classmethod
    def from_config(cls, kubeconfig: str | None = None, pool_size: int = 32) -> Kube:
        """Credentials from ``kubeconfig`` if given, else in-cluster, else ``~/.kube/config``."""
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            if kubeconfig:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=kubeconfig, client_configuration=cfg)
            else:
                try:
                    config.load_incluster_config(  # type: ignore[no-untyped-call]
                        client_configuration=cfg)
                except config.ConfigException:
                    config.load_kube_config(  # type: ignore[no-untyped-call]
                        client_configuration=cfg)
        except (config.ConfigException, OSError) as e:
            raise ConfigError(f"no Kubernetes credentials: {e}") from e
        # watches hold a connection each; workers must not queue behind them
        cfg.connection_pool_maxsize = pool_size
        return cls(client.ApiClient(cfg))

    def close(self) -> None:
        try:
            self.api.close()
        except Exception as e:  # closing a pool must not mask the shutdown reason
            log.debug("closing the API client", extra={"error": str(e)})

    # -- transport ------------------------------------------------------------

    def _call(self, method: str, path: str, *, query: dict[str, Any] | None = None,
              body: Any = None, content_type: str | None = None,
              timeout: float | tuple[float, float] | None = None) -> Any:
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = [(k, v if not isinstance(v, bool) else str(v).lower())
                  for k, v in (query or {}).items() if v is not None]
        try:
            m, url, hdrs, data, post = self.api.param_serialize(
                method, path, query_params=params, header_params=headers, body=body,
                auth_settings=["BearerToken"])
            resp = self.api.call_api(m, url, header_params=hdrs, body=data, post_params=post,
                                     _request_timeout=timeout or self.timeout)
        except ApiException as e:
            raise _error(e.status or 0, e.body, f"{method} {path}") from e
        except Exception as e:  # urllib3/ssl/socket: the server did not answer
            raise ApiError(f"{method} {path}: {type(e).__name__}: {e}") from e
        raw = resp.response  # urllib3, not preloaded: a watch streams from it
        if resp.status >= 400:
            try:
                body_bytes = raw.data
            finally:
                raw.release_conn()
            raise _error(resp.status, body_bytes, f"{method} {path}")
        return raw

    def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        resp = self._call(method, path, **kw)
        try:
            data = resp.data
        finally:
            resp.release_conn()
        out: dict[str, Any] = json.loads(data) if data else {}
        return out

    # -- verbs ----------------------------------------------------------------

    def get(self, res: Resource, name: str, namespace: str | None = None, *,
            timeout: float | tuple[float, float] | None = None) -> dict[str, Any]:
        return self.request("GET", res.path(namespace, name), timeout=timeout)

    def list(self, res: Resource, namespace: str | None = None, *,
             label_selector: str | None = None, field_selector: str | None = None,
             limit: int = 500) -> tuple[list[dict[str, Any]], str]:
        """All objects (paged) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            doc = self.request("GET", res.path(namespace), query={
                "labelSelector": label_selector, "fieldSelector": field_selector,
                "limit": limit, "continue": cont})
            items.extend(doc.get("items") or [])
            cont = (doc.get("metadata") or {}).get("continue")
            if not cont:
                return items, str((doc.get("metadata") or {}).get("resourceVersion", ""))

    def create(self, res: Resource, body: dict[str, Any],
               namespace: str | None = None) -> dict[str, Any]:
        return self.request("POST", res.path(namespace), body=body)

    def patch(self, res: Resource, name: str, patch: Any, namespace: str | None = None, *,
              sub: str | None = None, content_type: str = MERGE_PATCH,
              timeout: float | tuple[float, float] | None = None) -> dict[str, Any]:
        return self.request("PATCH", res.path(namespace, name, sub), body=patch,
                            content_type=content_type, timeout=timeout)

    def replace(self, res: Resource, name: str, body: dict[str, Any],
                namespace: str | None = None) -> dict[str, Any]:
        return self.request("PUT", res.path(namespace, name), body=body)

    def delete(self, res: Resource, name: str, namespace: str | None = None, *,
               propagation: str | None = "Background") -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            body["propagationPolicy"] = propagation
        try:
            self.request("DELETE", res.path(namespace, name), body=body)
        except NotFound:
            pass

    def watch(self, res: Resource, resource_version: str, namespace: str | None = None, *,
              label_selector: str | None = None, field_selector: str | None = None,
              timeout_seconds: int = 300) -> Iterator[dict[str, Any]]:
        """Watch events (dicts with ``type`` and ``object``) from ``resource_version``.

        Ends when the server closes the stream; a 410 arrives as ``Gone``.
        """
        from kubernetes.watch.watch import iter_resp_lines

        resp = self._call("GET", res.path(namespace), query={
            "watch": True, "resourceVersion": resource_version, "allowWatchBookmarks": True,
            "labelSelector": label_selector, "fieldSelector": field_selector,
            "timeoutSeconds": timeout_seconds},
            timeout=(10.0, timeout_seconds + 30.0))
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if not line:
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    obj = event.get("object") or {}
                    raise _error(int(obj.get("code") or 0), json.dumps(obj), "watch")
                yield event
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(f"watch {res.plural}: {type(e).__name__}: {e}") from e
        finally:
            resp.close()
            resp.release_conn()
