"""The catalog's certificate with several replicas, against the real API server.

Two catalog servers stand for two manager replicas behind one Service
(``controller.catalog.server.build``, as the manager builds it, with the
controller's own ServiceAccount and the RBAC of daemonset/controller-rbac.yaml).
Built at the same moment on an absent Secret, they must end up serving one
certificate, kept in that Secret, that verifies with the Secret's CA bundle;
a changed Secret (an edit, a deletion, a certificate near its end) is served
by both without a restart; a user's kubernetes.io/tls Secret is served as-is
and re-read too.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from cryptography import x509

from controller.catalog import server as catalog_server
from controller.catalog import tls
from kube import certs
from kube import client as k
from kube.informer import Informer
from tests import kubeenv
from tests.integration.test_catalog_api import SYSTEM_NS, apply_controller_rbac
from tests.integration.test_controller import ensure_namespace, wait_for

kube = kubeenv.kube

HOSTS = ("127.0.0.1", "localhost")
INTERVAL = 0.3  # seconds between a server's looks at its Secret


def served_fingerprint(port: int, ca: bytes | None = None) -> str:
    """SHA-256 of the certificate the server on ``port`` presents; verified against ``ca``
    (hostname 127.0.0.1 included) when given."""
    if ca is not None:
        ctx = ssl.create_default_context(cadata=ca.decode())
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def secret_data(client: k.Kube, name: str) -> dict[str, bytes]:
    obj = client.get(k.SECRETS, name, SYSTEM_NS)
    return {key: base64.b64decode(v) for key, v in (obj.get("data") or {}).items()}


class Replicas:
    """Catalog servers of one cluster, each with its own client (as separate pods)."""

    def __init__(self, env: kubeenv.KubeEnv) -> None:
        apply_controller_rbac(env)
        self.kubeconfig = env.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS)
        self.servers: list[catalog_server.CatalogServer] = []
        self.clients: list[k.Kube] = []

    def build(self, **config: Any) -> catalog_server.CatalogServer:
        client = k.Kube.from_config(self.kubeconfig)  # the controller's own rights only
        self.clients.append(client)
        cfg = catalog_server.Config(listen=("127.0.0.1", 0), hosts=HOSTS, namespace=SYSTEM_NS,
                                    tls_interval=INTERVAL, **config)
        server = catalog_server.build(cfg, client, Informer(client, k.CLUSTER_MODELS),
                                      lambda: pytest.fail("no registry call expected"))
        self.servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def build_together(self, n: int, **config: Any) -> list[catalog_server.CatalogServer]:
        """``n`` servers started at one moment: their first Secret reads race."""
        start = threading.Barrier(n)
        out: list[Any] = [None] * n

        def one(i: int) -> None:
            start.wait()
            try:
                out[i] = self.build(**config)
            except Exception as e:  # surfaced below with the others
                out[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out

    def stop(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()
        for c in self.clients:
            c.close()


@pytest.fixture(scope="module")
def cluster(kube: kubeenv.KubeEnv) -> Iterator[k.Kube]:
    """The API server as its administrator; no CRDs needed: only Secrets are at stake."""
    client = k.Kube.from_config(kube.kubeconfig)
    ensure_namespace(client, SYSTEM_NS)
    yield client
    client.close()


@pytest.fixture
def replicas(kube: kubeenv.KubeEnv, cluster: k.Kube) -> Iterator[Replicas]:
    r = Replicas(kube)
    yield r
    r.stop()


@pytest.fixture
def secret_name(cluster: k.Kube) -> Iterator[str]:
    name = f"catalog-tls-{uuid.uuid4().hex[:6]}"
    yield name
    try:
        cluster.delete(k.SECRETS, name, SYSTEM_NS)
    except k.NotFound:
        pass


def port(server: catalog_server.CatalogServer) -> int:
    return int(server.server_address[1])


def all_serve(servers: list[catalog_server.CatalogServer], fingerprint: str,
              ca: bytes | None = None) -> Callable[[], bool]:
    """Whether every server presents ``fingerprint`` (verified with ``ca``): a server
    still on its previous certificate fails verification, which is a "not yet"."""
    def check() -> bool:
        try:
            return all(served_fingerprint(port(s), ca) == fingerprint for s in servers)
        except ssl.SSLCertVerificationError:
            return False
    return check


def test_two_replicas_share_one_certificate(replicas: Replicas, cluster: k.Kube,
                                            secret_name: str, tmp_path: Any) -> None:
    a, b = replicas.build_together(2, ca_secret=secret_name)
    data = secret_data(cluster, secret_name)
    assert {"ca.crt", "ca.key", "ca-bundle.crt", "tls.crt", "tls.key"} <= set(data)
    want = certs.fingerprint(data["tls.crt"])
    # both present the Secret's certificate, and it verifies with the Secret's CA bundle
    assert served_fingerprint(port(a), data["ca-bundle.crt"]) == want
    assert served_fingerprint(port(b), data["ca-bundle.crt"]) == want
    assert a.cert_pem == b.cert_pem == data["ca-bundle.crt"]  # what importers trust
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(data["ca-bundle.crt"])
    for s in (a, b):  # an importer's HTTPS client through either replica
        r = requests.get(f"https://127.0.0.1:{port(s)}/healthz", verify=str(ca_file), timeout=10)
        assert r.status_code == 200
    # the shared certificate names the Service too, never a pod
    san = x509.load_pem_x509_certificate(data["tls.crt"]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    sans = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", f"modelcache-controller.{SYSTEM_NS}.svc"} <= sans
    assert socket.gethostname() not in sans


def test_changed_secret_is_served_without_restart(replicas: Replicas, cluster: k.Kube,
                                                  secret_name: str) -> None:
    a, b = replicas.build_together(2, ca_secret=secret_name)
    old = secret_data(cluster, secret_name)
    # an administrator replaces the CA and certificate (what certs.plan_secret makes from
    # nothing: a new CA, a new serving certificate for the same names)
    new = certs.plan_secret({}, a.tls_keeper.source.keeper.hosts,  # type: ignore[union-attr]
                            datetime.datetime.now(datetime.UTC),
                            ca_lifetime=tls.CA_LIFETIME, cert_lifetime=tls.CERT_LIFETIME)
    cluster.patch(k.SECRETS, secret_name, {"data": {
        key: base64.b64encode(v).decode() for key, v in new.items()}}, SYSTEM_NS)
    fp = certs.fingerprint(new["tls.crt"])
    wait_for(all_serve([a, b], fp, new["ca-bundle.crt"]), 30, what="the edited certificate")
    with pytest.raises(ssl.SSLCertVerificationError):
        served_fingerprint(port(a), old["ca-bundle.crt"])
    assert a.cert_pem == new["ca-bundle.crt"]

    # deleted: the first replica to look makes a new one, the other serves it too
    cluster.delete(k.SECRETS, secret_name, SYSTEM_NS)

    def remade() -> str | None:
        try:
            data = secret_data(cluster, secret_name)
        except k.NotFound:
            return None
        fp2 = certs.fingerprint(data["tls.crt"])
        return fp2 if fp2 != fp and all_serve([a, b], fp2, data["ca-bundle.crt"])() else None

    wait_for(remade, 30, what="a re-created certificate served by both")


def test_certificate_near_its_end_is_renewed_by_the_same_ca(replicas: Replicas,
                                                            cluster: k.Kube,
                                                            secret_name: str) -> None:
    a, b = replicas.build_together(2, ca_secret=secret_name)
    data = secret_data(cluster, secret_name)
    hosts = a.tls_keeper.source.keeper.hosts  # type: ignore[union-attr]
    now = datetime.datetime.now(datetime.UTC)
    # issued 89 days ago for 90: still valid, but due for renewal
    cert, key = certs.new_serving(data["ca.crt"], data["ca.key"], hosts,
                                  now - datetime.timedelta(days=89), tls.CERT_LIFETIME)
    cluster.patch(k.SECRETS, secret_name, {"data": {
        "tls.crt": base64.b64encode(cert).decode(),
        "tls.key": base64.b64encode(key).decode()}}, SYSTEM_NS)

    def renewed() -> str | None:
        now_data = secret_data(cluster, secret_name)
        fp = certs.fingerprint(now_data["tls.crt"])
        if fp in (certs.fingerprint(data["tls.crt"]), certs.fingerprint(cert)):
            return None
        # importers keep working: the same CA signs the renewed certificate
        return fp if all_serve([a, b], fp, data["ca-bundle.crt"])() else None

    wait_for(renewed, 30, what="a renewed certificate served by both")
    assert secret_data(cluster, secret_name)["ca.crt"] == data["ca.crt"]


def _tls_secret(client: k.Kube, name: str, cert: bytes, key: bytes, create: bool) -> None:
    data = {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()}
    if create:
        client.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                  "type": "kubernetes.io/tls",
                                  "metadata": {"name": name, "namespace": SYSTEM_NS},
                                  "data": data}, SYSTEM_NS)
    else:
        client.patch(k.SECRETS, name, {"data": data}, SYSTEM_NS)


def test_user_tls_secret_is_served_as_is_and_reloaded(replicas: Replicas, cluster: k.Kube,
                                                      secret_name: str) -> None:
    cert, key = certs.self_signed(["127.0.0.1"])
    _tls_secret(cluster, secret_name, cert, key, create=True)
    a, b = replicas.build_together(2, tls_secret=secret_name)
    assert served_fingerprint(port(a), cert) == served_fingerprint(port(b), cert) \
        == certs.fingerprint(cert)
    assert a.cert_pem is None  # no ca.crt in the Secret: its issuer is the owner's business
    cert2, key2 = certs.self_signed(["127.0.0.1"])
    _tls_secret(cluster, secret_name, cert2, key2, create=False)
    wait_for(all_serve([a, b], certs.fingerprint(cert2), cert2), 30, what="the renewed Secret")
    # a broken edit (a key of another certificate) is refused; the last good pair serves on
    _tls_secret(cluster, secret_name, cert, key2, create=False)
    with pytest.raises(tls.TLSConfigError, match="cannot be served"):
        a.tls_keeper.check()  # type: ignore[union-attr]
    assert served_fingerprint(port(a), cert2) == certs.fingerprint(cert2)


def test_missing_user_secret_is_a_clear_error(replicas: Replicas) -> None:
    with pytest.raises(tls.TLSConfigError, match=f"{SYSTEM_NS}/absent-tls not found"):
        replicas.build(tls_secret="absent-tls")


def test_certificate_files_are_reloaded(tmp_path: Any) -> None:
    """Out of cluster: PEM files, self-signed when absent, re-read when replaced."""
    cert_file, key_file = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    cfg = catalog_server.Config(listen=("127.0.0.1", 0), hosts=HOSTS, cert_file=cert_file,
                                key_file=key_file, tls_interval=INTERVAL)
    server = catalog_server.build(cfg, None, Informer(None, k.CLUSTER_MODELS),  # type: ignore[arg-type]
                                  lambda: pytest.fail("no registry call expected"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        made = (tmp_path / "tls.crt").read_bytes()
        assert server.cert_pem == made and oct((tmp_path / "tls.key").stat().st_mode)[-3:] == "600"
        assert served_fingerprint(port(server), made) == certs.fingerprint(made)
        cert, key = certs.self_signed(["127.0.0.1"])
        (tmp_path / "tls.key").write_bytes(key)
        (tmp_path / "tls.crt").write_bytes(cert)
        wait_for(all_serve([server], certs.fingerprint(cert), cert), 30, what="the new files")
        assert server.cert_pem is None  # no longer ours: its issuer is not known here
    finally:
        server.shutdown()
        server.server_close()


def test_config_refuses_contradictions() -> None:
    with pytest.raises(ValueError, match="both the certificate and the key"):
        catalog_server.Config(cert_file="/x.crt")
    with pytest.raises(ValueError, match="not both"):
        catalog_server.Config(cert_file="/x.crt", key_file="/x.key", tls_secret="s",
                              namespace="ns")
    with pytest.raises(ValueError, match="namespace"):
        catalog_server.Config(ca_secret="modelcache-catalog-tls")
