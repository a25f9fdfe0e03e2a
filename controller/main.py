"""``modelcache-controller``: one command, the manager's processes and its Jobs' entry points.

A thin dispatcher; each subcommand's work is elsewhere:

* ``manager``: the controller manager (``controller/app.py``): Model and
  ClusterModel reconcilers, publish Jobs, leader election, metrics, health.
* ``upload-gateway``: the upload gateway HTTP server (``controller/upload``).
* ``publish``, ``materialize``, ``pvc-upload``: what runs inside the
  manager's Job pods (``jobs/publish.py``, ``jobs/materialize.py``,
  ``jobs/pvc_reader.py``): a source → a ModelPack in the registry, a
  ModelPack → a SharedPVC, a mounted claim → an upload session. Each ends by
  the Job result protocol (``api/jobresult.py``): the result JSON to
  ``--result-file`` (the termination message), exit 0, 75 (retryable) or 1
  (terminal), with ``{"error": {"reason", "message", "retryable"}}``.

Credentials come from the environment or files named by flags, never from
flags' values, so they stay out of process listings.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from controller import gensecrets
from jobs import materialize, publish, pvc_reader
from jobs.publish import read_secret
from kube import logs
from kube.flags import size_arg
from modelpack.oci import mirrors as oci_mirrors
from modelpack.oci.registry import RegistryClient

MAX_GATE_WORKERS = 256  # --gate-workers; the chart's controller.gateWorkers refuses more


def _gateway_parser(sub: Any) -> None:
    p = sub.add_parser("upload-gateway", help="serve upload sessions")
    p.add_argument("--listen", default="127.0.0.1:8444", help="HOST:PORT")
    p.add_argument("--root", required=True, help="where sessions and uploads are kept")
    p.add_argument("--public-url", default="", help="the URL clients reach the gateway at")
    p.add_argument("--admin-token-file", help="the token that may create sessions")
    p.add_argument("--insecure-registry", action="store_true")
    p.add_argument("--registry-ca", help="PEM CA bundle the registry's certificate is checked "
                   "against (the DMCR's: the modelcache-registry-ca ConfigMap)")
    p.add_argument("--registry-username-file", help="the registry user it pushes as (re-read "
                   "for every publish; else $MODELCACHE_REGISTRY_USERNAME, else a docker "
                   "config.json)")
    p.add_argument("--registry-password-file")
    p.add_argument("--max-staging-bytes", default="0",
                   help="bytes --root may hold or have promised for uploads (e.g. 100Gi; "
                   "0: no limit); an upload past it is refused with 507, not staged")
    p.add_argument("--log-level", default=os.environ.get("MODELCACHE_LOG_LEVEL") or "INFO")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="the certificate's key (PEM)")
    p.add_argument("--session-grace", type=float, default=24 * 3600,
                   help="seconds an expired session's files are kept before removal")


def _registry_login(username_file: str | None, password_file: str | None
                    ) -> tuple[str | None, str | None]:
    """The registry user from files (a mounted Secret) or the environment; never logged."""
    return (read_secret(username_file) or os.environ.get("MODELCACHE_REGISTRY_USERNAME"),
            read_secret(password_file) or os.environ.get("MODELCACHE_REGISTRY_PASSWORD"))


def cmd_upload_gateway(args: argparse.Namespace) -> int:
    # the controller's own modules are imported on use: a Job pod's start-up skips them
    from controller.upload.gateway import Gateway, create_server

    if bool(args.registry_username_file) != bool(args.registry_password_file):
        raise SystemExit("modelcache-controller upload-gateway: --registry-username-file and "
                         "--registry-password-file go together")
    try:
        max_staging = size_arg(args.max_staging_bytes)
        _registry_login(args.registry_username_file, args.registry_password_file)
    except (ValueError, OSError) as e:
        raise SystemExit(f"modelcache-controller upload-gateway: {e}") from e
    logs.setup(args.log_level)

    def client_for(registry_host: str) -> RegistryClient:
        # read at every publish: a changed dmcr-credentials Secret (kubelet updates the
        # mounted files) is used without a restart
        user, password = _registry_login(args.registry_username_file,
                                         args.registry_password_file)
        return RegistryClient(registry_host, insecure=args.insecure_registry,
                              ca_bundle=args.registry_ca, username=user,
                              password=password)

    host, _, port = args.listen.rpartition(":")
    gateway = Gateway(args.root, public_url=args.public_url,
                      admin_token=read_secret(args.admin_token_file)
                      or os.environ.get("MODELCACHE_UPLOAD_ADMIN_TOKEN"),
                      client_factory=client_for, max_staging_bytes=max_staging)
    if args.tls_cert and not args.public_url:
        gateway.public_url = f"https://{host or '127.0.0.1'}:{port}"
    server = create_server((host or "127.0.0.1", int(port)), gateway)
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)

    def reap() -> None:
        while True:
            time.sleep(600)
            gateway.sessions.reap(args.session_grace)

    threading.Thread(target=reap, daemon=True, name="session-reaper").start()
    logging.getLogger(__name__).info("upload gateway listening",
                                     extra={"url": gateway.public_url})
    sys.stderr.write(f"upload gateway listening on {gateway.public_url}\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _manager_parser(sub: Any) -> None:
    env = os.environ.get
    p = sub.add_parser("manager", help="run the controller manager")
    p.add_argument("--kubeconfig", default=env("KUBECONFIG"),
                   help="default: in-cluster credentials, else ~/.kube/config")
    p.add_argument("--namespace", default=env("MODELCACHE_NAMESPACE") or env("POD_NAMESPACE")
                   or "modelcache-system",
                   help="the controller's namespace: publish Jobs, the Lease, ClusterModel Secrets")
    p.add_argument("--registry", default=env("MODELCACHE_REGISTRY"), required=not env(
        "MODELCACHE_REGISTRY"), help="the DMCR, HOST[:PORT] ($MODELCACHE_REGISTRY)")
    p.add_argument("--registry-insecure", action="store_true",
                   default=env("MODELCACHE_REGISTRY_INSECURE") == "true")
    p.add_argument("--registry-secret", default=env("MODELCACHE_REGISTRY_SECRET"),
                   help="Secret (username/password keys) in --namespace for the publish Jobs")
    p.add_argument("--registry-tls-secret", default=env("MODELCACHE_REGISTRY_TLS_SECRET") or "",
                   help="the DMCR over TLS: the Secret in --namespace where the replicas keep "
                   "its CA and certificate (controller/dmcrtls.py); its clients trust that CA")
    p.add_argument("--registry-ca-configmap", default="modelcache-registry-ca",
                   help="ConfigMap in --namespace the DMCR's CA bundle is published in (ca.crt)")
    p.add_argument("--registry-deployment", default="dmcr",
                   help="the DMCR Deployment rolled when its certificate is renewed ('': none)")
    p.add_argument("--registry-token-listen", default="",
                   help="HOST:PORT of the DMCR pull endpoint's token realm (GET /token over "
                   "HTTPS with the --registry-tls-secret certificate; controller/"
                   "registrytokens.py); materializers then get a one-repository ticket, "
                   "never the pull account ('': not served)")
    p.add_argument("--registry-token-secret", default="modelcache-dmcr-token",
                   help="Secret in --namespace with the realm's signing pair and ticket key "
                   "(made at start when absent)")
    p.add_argument("--registry-tls-host", action="append", default=[],
                   help="a DNS name or IP of the DMCR's certificate, besides the dmcr and "
                   "modelcache-controller Services' names (repeatable)")
    p.add_argument("--registry-username-file", help="the manager's own registry user (deletes)")
    p.add_argument("--registry-password-file")
    p.add_argument("--worker-image", default=env("MODELCACHE_WORKER_IMAGE")
                   or "modelcache-controller:latest")
    p.add_argument("--job-service-account", default=env("MODELCACHE_JOB_SERVICE_ACCOUNT"),
                   help="service account of publish Jobs' pods (default: the namespace's "
                   "default; no token is mounted either way)")
    p.add_argument("--hf-endpoint", default=env("HF_ENDPOINT"),
                   help="HF_ENDPOINT given to publish Jobs")
    p.add_argument("--deny-source-cidr", action="append", default=[], metavar="CIDR",
                   help="a network publish Jobs may not fetch sources from (repeatable; e.g. "
                   "the cluster's service network), besides link-local and loopback, always "
                   "denied (ingest/sources/netpolicy.py)")
    p.add_argument("--allow-private-sources", action="store_true",
                   default=env("MODELCACHE_ALLOW_PRIVATE_SOURCES", "") in ("1", "true"),
                   help="no source address deny list in publish Jobs (development, tests; "
                   "--embedded-jobs implies it: the Jobs run on the user's own machine)")
    p.add_argument("--listen", default="0.0.0.0:8080",
                   help="HOST:PORT of /healthz /readyz /metrics and /report")
    p.add_argument("--report-url", default=env("MODELCACHE_REPORT_URL"),
                   help="the URL publish Jobs reach --listen at (no progress reports without)")
    p.add_argument("--credentials-url", default="",
                   help="the URL publish Jobs ask for their source credential at (GET "
                   "URL/credentials/JOB, controller/models/credentials.py): the token realm's "
                   "https:// address; without --registry-token-listen, default --report-url "
                   "(plain HTTP: the demo and tests only)")
    p.add_argument("--report-key-file", help="HMAC key of report tokens "
                   "(default $MODELCACHE_REPORT_KEY, else random per process)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--job-backoff-limit", type=int, default=3)
    p.add_argument("--job-ttl", type=int, default=24 * 3600,
                   help="ttlSecondsAfterFinished of publish Jobs (-1: none)")
    p.add_argument("--history-keep", type=int, default=5,
                   help="published generations each model keeps in status.history and the "
                   "registry (1-50); older ones no pod mounts are deleted")
    p.add_argument("--job-active-deadline", default="24h",
                   help="activeDeadlineSeconds of publish Jobs, a duration like 24h or 90m "
                   "('0s': none); a Model's spec.publish.timeout replaces it")
    p.add_argument("--publish-work-size", default=env("MODELCACHE_PUBLISH_WORK_SIZE") or "",
                   help="give each publish Job a PVC of this size (e.g. 500Gi: the largest "
                   "model, an archive twice) for its work directory, so a retried pod resumes "
                   "the download where the last one stopped; '' (default): an emptyDir, and a "
                   "retry starts from byte 0")
    p.add_argument("--publish-work-storage-class",
                   default=env("MODELCACHE_PUBLISH_WORK_STORAGE_CLASS") or "",
                   help="StorageClass of those PVCs ('': the cluster's default class)")
    # what a namespaced Model's spec.publish may ask of its Job (controller/models/policy.py)
    p.add_argument("--publish-allow-node-selector", action="append", default=[],
                   metavar="KEY[=VALUE]", help="a nodeSelector a Model's publish Job may use "
                   "(repeat); none by default")
    p.add_argument("--publish-allow-toleration", action="append", default=[],
                   metavar="KEY[:EFFECT]", help="a toleration key (and effect) a Model's "
                   "publish Job may use (repeat); none by default")
    p.add_argument("--publish-max-resource", action="append", default=[],
                   metavar="NAME=QUANTITY", help="the most a Model's publish Job may request "
                   "or limit of NAME (repeat); defaults cpu=4, memory=16Gi, "
                   "ephemeral-storage=100Gi, nvidia.com/gpu=0; other resources are refused")
    p.add_argument("--job-max-timeout", default="48h",
                   help="the longest spec.publish.timeout a Model may ask (a duration)")
    p.add_argument("--job-max-ttl-after-finished", default="168h",
                   help="the longest spec.publish.ttlAfterFinished a Model may ask (a duration)")
    p.add_argument("--no-leader-elect", dest="leader_elect", action="store_false")
    p.add_argument("--lease-duration", type=float, default=15.0)
    p.add_argument("--lease-renew", type=float, default=5.0)
    p.add_argument("--progress-interval", type=float, default=1.0,
                   help="at most one status.progress write per model per this many seconds")
    p.add_argument("--secret-recheck-interval", type=float, default=60.0,
                   help="seconds between re-reads of namespaced Models' Secrets (no watch "
                        "outside --namespace): a changed one re-publishes")
    p.add_argument("--upload-gateway-url", default=env("MODELCACHE_UPLOAD_GATEWAY_URL"),
                   help="the upload gateway's URL as the manager reaches it (source.upload)")
    p.add_argument("--upload-admin-token-file",
                   help="the gateway's admin token (else MODELCACHE_UPLOAD_ADMIN_TOKEN)")
    p.add_argument("--upload-session-ttl", type=float, default=24 * 3600.0,
                   help="seconds an upload session's token is valid")
    p.add_argument("--upload-poll-interval", type=float, default=5.0,
                   help="seconds between looks at a waiting upload session")
    p.add_argument("--log-level", default=env("MODELCACHE_LOG_LEVEL") or "INFO")
    p.add_argument("--distribution-mode", choices=["Internal", "PublicCatalog"],
                   default=env("MODELCACHE_DISTRIBUTION_MODE") or "Internal",
                   help="PublicCatalog: serve the catalog API (Ready ClusterModels) over HTTPS")
    p.add_argument("--catalog-listen", default="0.0.0.0:8443", help="HOST:PORT of the catalog")
    p.add_argument("--catalog-tls-cert", help="PEM certificate file (self-signed and written "
                   "here when it does not exist); re-read when it changes")
    p.add_argument("--catalog-tls-key", help="PEM key of --catalog-tls-cert")
    p.add_argument("--catalog-tls-secret", help="a kubernetes.io/tls Secret in --namespace "
                   "(tls.crt, tls.key, optional ca.crt) served as-is; re-read when it changes")
    p.add_argument("--catalog-ca-secret", default="modelcache-catalog-tls",
                   help="without a certificate: the Secret in --namespace where the replicas "
                   "keep one self-signed CA and serving certificate (the first creates it, "
                   "any rotates it); '' = a certificate per process, in memory")
    p.add_argument("--catalog-tls-interval", type=float, default=30.0,
                   help="seconds between looks at the certificate's file or Secret")
    p.add_argument("--catalog-tls-host", action="append", default=[],
                   help="DNS name or IP of a self-signed certificate, besides the "
                   "modelcache-controller Service's names (repeatable)")
    p.add_argument("--catalog-auth-ttl", type=float, default=10.0,
                   help="seconds a TokenReview/SubjectAccessReview decision is reused")
    p.add_argument("--catalog-rate", type=float, default=50.0,
                   help="catalog requests per second per client address")
    p.add_argument("--catalog-burst", type=int, default=200)
    p.add_argument("--catalog-audience", action="append", default=[],
                   help="TokenReview audience (repeatable; default: the API server's)")
    p.add_argument("--no-shared-pvc", dest="shared_pvc", action="store_false",
                   help="do not run SharedPVC delivery (its PVCs, materializer Jobs, GC)")
    p.add_argument("--shared-pvc-storage-class", default=env("MODELCACHE_SHARED_PVC_STORAGE_CLASS"),
                   help="RWX StorageClass of SharedPVCs when the model names none "
                   "(default: the cluster's default class)")
    p.add_argument("--shared-pvc-grace", type=float, default=600.0,
                   help="seconds an unused SharedPVC is kept before it is deleted")
    p.add_argument("--shared-pvc-retry-base", type=float, default=30.0,
                   help="seconds before a failed materializer Job is retried (doubled per "
                   "failure, at most an hour)")
    p.add_argument("--registry-pull-secret", default=env("MODELCACHE_REGISTRY_PULL_SECRET"),
                   help="Secret (username/password keys, pull-only) in --namespace, copied "
                   "next to each materializer Job (default: anonymous pulls)")
    p.add_argument("--pull-registry", default=env("MODELCACHE_PULL_REGISTRY"),
                   help="HOST:PORT materializer Jobs pull from instead of --registry (the "
                   "DMCR's read-only endpoint, which --registry-pull-secret opens)")
    p.add_argument("--registry-mirror", action="append", default=[], metavar="HOST=URL",
                   help="materializer Jobs ask URL first for HOST's blobs and pinned manifests "
                   "(repeatable, in order; every byte is verified, the DMCR is the fallback)")
    p.add_argument("--registry-hosts-dir", default=None, metavar="DIR",
                   help="materializer mirrors in containerd's certs.d layout: DIR/HOST/hosts.toml")
    p.add_argument("--webhook-service", default=env("MODELCACHE_WEBHOOK_SERVICE"),
                   help="NAME:PORT of the Service in --namespace that reaches --webhook-listen: "
                   "turns on workload delivery (admission webhook + scheduling gates)")
    p.add_argument("--webhook-url", default=env("MODELCACHE_WEBHOOK_URL"),
                   help="instead of --webhook-service: the https:// URL the API server calls "
                   "(out of cluster, tests); the certificate is issued for its host")
    p.add_argument("--webhook-listen", default="0.0.0.0:9443", help="HOST:PORT of the webhook")
    p.add_argument("--webhook-secret", default="modelcache-webhook-tls",
                   help="Secret in --namespace for the webhook's CA and certificate")
    p.add_argument("--webhook-config-name", default="modelcache",
                   help="the MutatingWebhookConfiguration the manager keeps in sync")
    p.add_argument("--gate-workers", type=_gate_workers, default=16, metavar="N",
                   help="scheduling-gate lifts in flight (1-256; default 16): one PATCH per "
                   "pod, so on a control plane with more cores more lift faster "
                   "(bench/scale; the API connection pool grows to match)")
    p.add_argument("--default-delivery", choices=["NodeCache", "SharedPVC"],
                   default=env("MODELCACHE_DEFAULT_DELIVERY") or "NodeCache",
                   help="delivery mode when neither the workload nor the model names one")
    p.add_argument("--embedded-jobs", metavar="DIR", default=None,
                   help="embedded mode, where no kubelet runs: execute the manager's Jobs as "
                   "local processes, their files under DIR (controller/embedded/jobrunner.py)")
    p.add_argument("--embedded-jobs-namespace", action="append", default=[], metavar="NS",
                   help="with --embedded-jobs: also run the manager's Jobs in namespace NS "
                   "(source.pvc's reader runs in the Model's namespace), under DIR/namespaces/NS")


def cmd_manager(args: argparse.Namespace) -> int:
    # imported on use (so are the config helpers' below): a Job pod's start-up skips them
    from controller import app
    from controller.models import publishjob as jobs

    logs.setup(args.log_level)
    key = (read_secret(args.report_key_file) or os.environ.get("MODELCACHE_REPORT_KEY")
           or secrets.token_hex(32)).encode()
    host, _, port = args.listen.rpartition(":")
    username, password = _registry_login(args.registry_username_file,
                                         args.registry_password_file)
    registry_tls = _registry_tls(args)
    settings = jobs.Settings(
        namespace=args.namespace, registry=args.registry, image=args.worker_image,
        registry_insecure=args.registry_insecure, registry_secret=args.registry_secret,
        registry_ca=registry_tls.ca_file if registry_tls is not None else None,
        hf_endpoint=args.hf_endpoint, report_url=args.report_url, report_key=key,
        credentials_url=_credentials_url(args),
        backoff_limit=args.job_backoff_limit, service_account=args.job_service_account,
        ttl_after_finished=None if args.job_ttl < 0 else args.job_ttl,
        active_deadline=_active_deadline(args), history_keep=args.history_keep,
        work_volume=_work_volume(args), extra_env=_source_policy_env(args),
        publish_policy=_publish_policy(args),
        registry_mirrors=oci_mirrors.load(args.registry_hosts_dir, args.registry_mirror))
    _install_source_policy(args)
    opts = app.Options(
        settings=settings, kubeconfig=args.kubeconfig, listen=(host or "0.0.0.0", int(port)),
        workers=args.workers, leader_elect=args.leader_elect,
        lease_duration=args.lease_duration, lease_renew=args.lease_renew,
        registry_username=username, registry_password=password,
        progress_interval=args.progress_interval, upload=_upload_config(args),
        secret_recheck_interval=args.secret_recheck_interval,
        shared_pvc=_shared_pvc_config(args), catalog=_catalog_config(args),
        delivery=_delivery_config(args), registry_tls=registry_tls,
        registry_tokens=_registry_tokens(args, registry_tls))
    manager = app.Manager(opts)
    runner = None
    if args.embedded_jobs:
        from controller.embedded.jobrunner import JobRunner  # on use, as above

        runner = JobRunner(manager.client, args.namespace, work_root=args.embedded_jobs).start()
    # their roots lie under the first runner's, which removes them all when it stops
    runners = [JobRunner(manager.client, ns, work_root=os.path.join(
        args.embedded_jobs, "namespaces", ns)).start()
        for ns in args.embedded_jobs_namespace if args.embedded_jobs and ns != args.namespace]
    try:
        return manager.run()
    finally:
        for r in runners:
            r.stop()
        if runner is not None:
            runner.stop()


def _credentials_url(args: argparse.Namespace) -> str | None:
    """Where publish Jobs borrow their source credential: HTTPS whenever the token realm
    is served (the chart); the plain report URL only without it (the demo, tests)."""
    if args.registry_token_listen:
        if args.credentials_url and not args.credentials_url.startswith("https://"):
            raise SystemExit("modelcache-controller: --credentials-url must be https:// "
                             "(the token realm's listener)")
        return args.credentials_url or None
    return args.credentials_url or args.report_url or None


def _registry_tls(args: argparse.Namespace) -> Any:
    from controller import dmcrtls  # on use, as in cmd_manager

    if not args.registry_tls_secret:
        return None
    if args.registry_insecure:
        raise SystemExit("modelcache-controller: --registry-tls-secret or --registry-insecure, "
                         "not both")
    return dmcrtls.Config(namespace=args.namespace, secret=args.registry_tls_secret,
                          ca_configmap=args.registry_ca_configmap,
                          deployment=args.registry_deployment or None,
                          extra_hosts=tuple(args.registry_tls_host))


def _registry_tokens(args: argparse.Namespace, registry_tls: Any) -> Any:
    from controller import registrytokens  # on use, as in cmd_manager

    if not args.registry_token_listen:
        return None
    if registry_tls is None:
        raise SystemExit("modelcache-controller: --registry-token-listen needs "
                         "--registry-tls-secret (the realm is served over HTTPS)")
    host, _, port = args.registry_token_listen.rpartition(":")
    return registrytokens.Config(listen=(host or "0.0.0.0", int(port)),
                                 namespace=args.namespace, secret=args.registry_token_secret,
                                 pull_secret=args.registry_pull_secret or None)


def _source_policy_env(args: argparse.Namespace) -> dict[str, str]:
    """The source address policy, as the publish Jobs' env (``jobs/publish.py`` reads it)."""
    from ingest.sources import netpolicy  # on use, as above

    if args.allow_private_sources or args.embedded_jobs:
        return {netpolicy.ENV_ALLOW_PRIVATE: "1"}
    try:
        netpolicy.Policy(args.deny_source_cidr)
    except ValueError as e:
        raise SystemExit(f"modelcache-controller: --deny-source-cidr: {e}") from e
    return {netpolicy.ENV_DENY: ",".join(args.deny_source_cidr)} if args.deny_source_cidr else {}


def _publish_policy(args: argparse.Namespace) -> Any:
    from controller.models import policy  # on use, as in cmd_manager

    try:
        return policy.from_flags(args.publish_allow_node_selector,
                                 args.publish_allow_toleration, args.publish_max_resource,
                                 getattr(args, "job_max_timeout", None),
                                 getattr(args, "job_max_ttl_after_finished", None))
    except ValueError as e:
        raise SystemExit(f"modelcache-controller: {e}") from e


def _active_deadline(args: argparse.Namespace) -> int | None:
    from controller.models import policy  # on use, as in cmd_manager

    try:
        return policy.duration(args.job_active_deadline) or None
    except ValueError as e:
        raise SystemExit(f"modelcache-controller: --job-active-deadline: {e}") from e


def _install_source_policy(args: argparse.Namespace) -> None:
    """The same policy for the manager's own source calls (upstream probes, catalog
    listings): URL checks, and the connect guard inside ``netpolicy.guarded()`` only."""
    from ingest.sources import netpolicy  # on use, as above

    netpolicy.install(netpolicy.from_settings(
        args.deny_source_cidr, args.allow_private_sources or bool(args.embedded_jobs), {}),
        whole_process=False)


def _work_volume(args: argparse.Namespace) -> Any:
    from controller.models import publishjob as jobs  # on use, as in cmd_manager

    if not args.publish_work_size:
        return None
    try:
        size_arg(args.publish_work_size)  # a quantity the API server takes, checked here
    except ValueError as e:
        raise SystemExit(f"modelcache-controller: --publish-work-size: {e}") from e
    return jobs.WorkVolume(args.publish_work_size.strip(),
                           args.publish_work_storage_class or None)


def _catalog_config(args: argparse.Namespace) -> Any:
    from controller.catalog import server  # on use, as in cmd_manager

    if args.distribution_mode != "PublicCatalog":
        return None
    host, _, port = args.catalog_listen.rpartition(":")
    try:
        return server.Config(listen=(host or "0.0.0.0", int(port)),
                             cert_file=args.catalog_tls_cert, key_file=args.catalog_tls_key,
                             hosts=tuple(args.catalog_tls_host), auth_ttl=args.catalog_auth_ttl,
                             rate=args.catalog_rate, burst=args.catalog_burst,
                             audiences=tuple(args.catalog_audience), namespace=args.namespace,
                             tls_secret=args.catalog_tls_secret or None,
                             ca_secret=args.catalog_ca_secret or None,
                             tls_interval=args.catalog_tls_interval)
    except ValueError as e:
        raise SystemExit(f"modelcache-controller: {e}") from e


def _gate_workers(text: str) -> int:
    n = int(text)
    if not 1 <= n <= MAX_GATE_WORKERS:
        raise argparse.ArgumentTypeError(f"1 to {MAX_GATE_WORKERS}, not {n}")
    return n


def _delivery_config(args: argparse.Namespace) -> Any:
    from controller.delivery import webhook  # on use, as in cmd_manager

    if not (args.webhook_service or args.webhook_url):
        return None
    if args.webhook_service and args.webhook_url:
        raise SystemExit("modelcache-controller: --webhook-service or --webhook-url, not both")
    host, _, port = args.webhook_listen.rpartition(":")
    return webhook.Config(listen=(host or "0.0.0.0", int(port)), url=args.webhook_url,
                          service=args.webhook_service, secret=args.webhook_secret,
                          config_name=args.webhook_config_name,
                          default_mode=args.default_delivery, gate_workers=args.gate_workers)


def _shared_pvc_config(args: argparse.Namespace) -> Any:
    from controller.delivery import sharedpvc  # on use, as in cmd_manager

    if not args.shared_pvc:
        return None
    return sharedpvc.Config(storage_class=args.shared_pvc_storage_class or None,
                            grace=args.shared_pvc_grace, retry_base=args.shared_pvc_retry_base,
                            pull_secret=args.registry_pull_secret or None,
                            pull_registry=args.pull_registry or None,
                            ticket_secret=args.registry_token_secret
                            if args.registry_token_listen else None)


def _upload_config(args: argparse.Namespace) -> Any:
    from controller.upload import client as uploads  # on use, as in cmd_manager

    if not args.upload_gateway_url:
        return None
    token = (read_secret(args.upload_admin_token_file)
             or os.environ.get("MODELCACHE_UPLOAD_ADMIN_TOKEN"))
    if not token:
        raise SystemExit("modelcache-controller: --upload-gateway-url needs an admin token "
                         "(--upload-admin-token-file or MODELCACHE_UPLOAD_ADMIN_TOKEN)")
    return uploads.Config(args.upload_gateway_url, token, args.upload_session_ttl,
                          args.upload_poll_interval)


PARSERS: list[Callable[[Any], None]] = [publish.add_parser, _gateway_parser, _manager_parser,
                                        materialize.add_parser, pvc_reader.add_parser,
                                        gensecrets.add_parser]
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "materialize": materialize.main,
    "pvc-upload": pvc_reader.main,
    "publish": publish.main,
    "upload-gateway": cmd_upload_gateway,
    "manager": cmd_manager,
    "gen-secrets": gensecrets.main,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelcache-controller")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    args = parser.parse_args(argv)
    # plain text for the Job entry points (the manager and the gateway switch to JSON)
    logs.setup(os.environ.get("MODELCACHE_LOG_LEVEL", "warning"), "text")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
