"""The DMCR pull endpoint in token mode (controller/registrytokens.py), written as
attacks: two real docker-registry processes on one storage (push: htpasswd; pull:
read-only, ``auth: token``), the realm served over HTTPS with a certificate of
the controller's CA, and ``RegistryClient`` running the token dance as nodes and
materializers do. Then, on the real kube-apiserver, what a materializer's Secret
in a tenant namespace holds.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from cli.local import registry as localregistry
from controller import dmcrtls
from controller import registrytokens as rt
from controller.delivery import materializer
from controller.models import publishjob as jobs
from kube import certs
from kube import client as k
from modelpack.errors import ModelPackError
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_dir
from tests import kubeenv, modelgen
from tests.integration.test_catalog_api import SYSTEM_NS, apply_controller_rbac
from tests.integration.test_controller import ensure_namespace
from tests.servers.helpers import same_tree

kube = kubeenv.kube

PULL_USER, PULL_PASSWORD = "puller", "pull-secret"
A, B = "models/team-a/m", "models/team-b/secret-model"


class Dmcr:
    def __init__(self, rw: localregistry.LocalRegistry, ro: localregistry.LocalRegistry,
                 ca: str, keys: rt.Keys, digests: dict[str, str], model: str) -> None:
        self.rw, self.ro, self.ca, self.keys, self.digests = rw, ro, ca, keys, digests
        self.model = model
        self.realm = ""

    def client(self, user: str, password: str) -> RegistryClient:
        return RegistryClient(self.ro.host, ca_bundle=self.ca, username=user,
                              password=password, retries=0)

    def ticket(self, repo: str, ttl: float = 600.0, ns: str = "team-a") -> str:
        return rt.make_ticket(self.keys.ticket_key, ns, repo, time.time() + ttl)


@pytest.fixture(scope="module")
def dmcr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dmcr]:
    base = tmp_path_factory.mktemp("dmcr-tokens")
    small_model = str(base / "model")
    modelgen.make_safetensors_model(small_model)
    now = datetime.datetime.now(datetime.UTC)
    ca_pem, ca_key = certs.new_ca(now, datetime.timedelta(days=1), "modelcache-dmcr-ca")
    cert, key = certs.new_serving(ca_pem, ca_key, ["127.0.0.1"], now, datetime.timedelta(days=1))
    for name, data in (("ca.crt", ca_pem), ("tls.crt", cert), ("tls.key", key)):
        (base / name).write_bytes(data)
    keys = rt.new_keys()
    (base / "token.crt").write_bytes(keys.cert)
    issuer = rt.Issuer(keys, lambda: (PULL_USER, PULL_PASSWORD))
    realm = rt.create_server(("127.0.0.1", 0), issuer, certs.server_context(cert, key))
    threading.Thread(target=realm.serve_forever, daemon=True).start()
    data = str(base / "data")
    auth = {"token": {"realm": f"https://127.0.0.1:{realm.server_address[1]}/token",
                      "service": rt.SERVICE, "issuer": rt.ISSUER,
                      "rootcertbundle": str(base / "token.crt")}}
    with localregistry.running(root=str(base / "rw"), data_dir=data, username="modelcache",
                               password="push-secret") as rw, \
            localregistry.running(root=str(base / "ro"), data_dir=data, readonly=True,
                                  auth=auth, tls=(str(base / "tls.crt"),
                                                  str(base / "tls.key"))) as ro:
        pusher = RegistryClient(rw.host, insecure=True, username="modelcache",
                                password="push-secret")
        digests = {repo: pack_to_registry(small_model, pusher,
                                          parse(f"{rw.host}/{repo}:v1")).pack.digest
                   for repo in (A, B)}
        d = Dmcr(rw, ro, str(base / "ca.crt"), keys, digests, small_model)
        d.realm = str(auth["token"]["realm"])  # type: ignore[index]
        yield d
    realm.shutdown()
    realm.server_close()


def pull(d: Dmcr, client: RegistryClient, repo: str, dest: str) -> None:
    pull_to_dir(client, parse(f"{d.ro.host}/{repo}@{d.digests[repo]}"), dest)


def test_node_account_pulls_any_repository(dmcr: Dmcr, tmp_path) -> None:
    node = dmcr.client(PULL_USER, PULL_PASSWORD)
    for repo in (A, B):
        pull(dmcr, node, repo, str(tmp_path / repo.replace("/", "_")))
        same_tree(dmcr.model, str(tmp_path / repo.replace("/", "_")))


def test_ticket_pulls_only_its_repository(dmcr: Dmcr, tmp_path) -> None:
    mat = dmcr.client(rt.MATERIALIZER, dmcr.ticket(A))
    pull(dmcr, mat, A, str(tmp_path / "a"))
    same_tree(dmcr.model, str(tmp_path / "a"))
    with pytest.raises(ModelPackError):  # a ticket for A, asked for B: no access granted
        mat.get_manifest(parse(f"{dmcr.ro.host}/{B}@{dmcr.digests[B]}"))


def test_expired_tampered_or_overlong_ticket_refused(dmcr: Dmcr) -> None:
    expired = rt.make_ticket(dmcr.keys.ticket_key, "team-a", A, time.time() - 1)
    payload, _, mac = dmcr.ticket(A).partition(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["repo"] = B  # the same MAC over a payload naming another repository
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{forged_payload}.{mac}"
    other_key = rt.make_ticket(b"k" * 32, "team-a", B, time.time() + 60)
    overlong = dmcr.ticket(B, ttl=rt.MAX_TICKET_TTL + 600)
    for ticket, repo in ((expired, A), (forged, B), (other_key, B), (overlong, B)):
        with pytest.raises(ModelPackError):
            dmcr.client(rt.MATERIALIZER, ticket).get_manifest(
                parse(f"{dmcr.ro.host}/{repo}@{dmcr.digests[repo]}"))
    with pytest.raises(ModelPackError):  # the pull account's name with a wrong password
        dmcr.client(PULL_USER, "guess").get_manifest(
            parse(f"{dmcr.ro.host}/{A}@{dmcr.digests[A]}"))


def test_no_credential_pushes_or_lists_on_the_pull_endpoint(dmcr: Dmcr, small_model) -> None:
    for user, password in ((PULL_USER, PULL_PASSWORD), (rt.MATERIALIZER, dmcr.ticket(A))):
        with pytest.raises(ModelPackError):
            pack_to_registry(small_model, dmcr.client(user, password),
                             parse(f"{dmcr.ro.host}/{A}:overwritten"))
    # the realm itself never grants push, delete or the catalog, whatever is asked
    issuer = rt.Issuer(dmcr.keys, lambda: (PULL_USER, PULL_PASSWORD))
    basic = "Basic " + base64.b64encode(f"{PULL_USER}:{PULL_PASSWORD}".encode()).decode()
    _, access = issuer.grant(basic, [f"repository:{A}:push,pull,delete",
                                     "registry:catalog:*"])
    assert access == [{"type": "repository", "name": A, "actions": ["pull"]}]
    # asked of the realm over HTTPS, as a client would: a token that opens nothing
    answer = requests.get(dmcr.realm, verify=dmcr.ca, timeout=10, headers={"Authorization": basic},
                          params={"service": rt.SERVICE, "scope": "registry:catalog:*"})
    token = answer.json()["token"]
    listing = requests.get(f"https://{dmcr.ro.host}/v2/_catalog", verify=dmcr.ca, timeout=10,
                           headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and listing.status_code == 401
    refused = requests.get(dmcr.realm, verify=dmcr.ca, timeout=10,
                           params={"service": rt.SERVICE, "scope": f"repository:{A}:pull"})
    assert refused.status_code == 401  # no credentials: no token at all


# -- the materializer's Secret in a tenant namespace ------------------------------------


@pytest.fixture(scope="module")
def controller(kube: kubeenv.KubeEnv) -> Iterator[tuple[k.Kube, k.Kube]]:
    admin = k.Kube.from_config(kube.kubeconfig)
    ensure_namespace(admin, SYSTEM_NS)
    apply_controller_rbac(kube)
    own = k.Kube.from_config(kube.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS))
    yield admin, own
    own.close()
    admin.close()


def test_materializer_secret_holds_a_ticket_not_the_pull_account(controller,
                                                                dmcr: Dmcr) -> None:
    admin, own = controller
    ensure_namespace(admin, "team-a")
    for name, data in (("dmcr-pull-credentials", {"username": PULL_USER,
                                                  "password": PULL_PASSWORD}),):
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                "stringData": data}
        try:
            admin.create(k.SECRETS, body, SYSTEM_NS)
        except k.Conflict:
            pass
    secret = f"dmcr-token-{os.urandom(3).hex()}"
    pvc = admin.create(k.PVCS, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"generateName": "shared-"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}},
        "team-a")
    settings = jobs.Settings(namespace=SYSTEM_NS, registry="dmcr.modelcache-system.svc:5000")
    m = materializer.Materializer(
        own, settings, jobs_cache=None, recorder=None, metrics=None,  # type: ignore[arg-type]
        annotate=lambda p, a: p, pull_secret="dmcr-pull-credentials", retry_base=1,
        retry_max=1, ticket_secret=secret)
    reference = f"{dmcr.ro.host}/{A}@{dmcr.digests[A]}"
    assert m.ensure_pull_secret(pvc, reference)
    claim = pvc["metadata"]["name"]
    got: dict[str, Any] = admin.get(k.SECRETS, materializer.pull_secret_name(claim), "team-a")
    values = {key: base64.b64decode(v).decode() for key, v in got["data"].items()}
    assert PULL_PASSWORD not in json.dumps(values) and values["username"] == rt.MATERIALIZER
    keys = rt.ensure_keys(admin, SYSTEM_NS, secret)  # made by the materializer's first call
    assert rt.check_ticket(keys.ticket_key, values["password"], time.time()) == A
    # the ticket, used as the Job uses it, against a realm with these keys: A only
    dmcr_keys = dmcr.keys
    dmcr.keys = keys
    try:
        issuer = rt.Issuer(keys, lambda: None)
        basic = "Basic " + base64.b64encode(
            f"{rt.MATERIALIZER}:{values['password']}".encode()).decode()
        assert issuer.grant(basic, [f"repository:{B}:pull"])[1] == []
        assert issuer.grant(basic, [f"repository:{A}:pull"])[1] == [
            {"type": "repository", "name": A, "actions": ["pull"]}]
    finally:
        dmcr.keys = dmcr_keys


def test_manager_realm_serves_nodes_with_its_own_keys_and_certificate(controller, dmcr: Dmcr,
                                                                      tmp_path) -> None:
    """The manager's realm (``Realm``: keys made in its Secret, the pull account read from
    dmcr-pull-credentials, HTTPS with the DMCR's certificate), with the controller's own
    RBAC, in front of a token-mode pull endpoint trusting the Secret's certificate."""
    admin, own = controller
    for name, data in (("dmcr-pull-credentials", {"username": PULL_USER,
                                                  "password": PULL_PASSWORD}),):
        try:
            admin.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                     "metadata": {"name": name}, "stringData": data}, SYSTEM_NS)
        except k.Conflict:
            pass
    suffix = os.urandom(3).hex()
    tls = dmcrtls.RegistryTLS(own, dmcrtls.Config(
        namespace=SYSTEM_NS, secret=f"dmcr-tls-{suffix}", deployment=None,
        extra_hosts=("127.0.0.1",), ca_file=str(tmp_path / "ca.crt")))
    bundle = tls.sync()
    realm = rt.Realm(own, rt.Config(listen=("127.0.0.1", 0), namespace=SYSTEM_NS,
                                    secret=f"dmcr-token-{suffix}",
                                    pull_secret="dmcr-pull-credentials"))
    realm.start(bundle)
    try:
        assert realm.server is not None
        token_crt = base64.b64decode(admin.get(k.SECRETS, f"dmcr-token-{suffix}",
                                               SYSTEM_NS)["data"]["tls.crt"])
        (tmp_path / "token.crt").write_bytes(token_crt)
        (tmp_path / "tls.crt").write_bytes(bundle.cert)
        (tmp_path / "tls.key").write_bytes(bundle.key)
        auth = {"token": {"realm": f"https://127.0.0.1:{realm.server.server_address[1]}/token",
                          "service": rt.SERVICE, "issuer": rt.ISSUER,
                          "rootcertbundle": str(tmp_path / "token.crt")}}
        with localregistry.running(root=str(tmp_path / "ro"), data_dir=dmcr.rw.data_dir,
                                   readonly=True, auth=auth,
                                   tls=(str(tmp_path / "tls.crt"),
                                        str(tmp_path / "tls.key"))) as ro:
            node = RegistryClient(ro.host, ca_bundle=str(tmp_path / "ca.crt"),
                                  username=PULL_USER, password=PULL_PASSWORD, retries=0)
            pull_to_dir(node, parse(f"{ro.host}/{B}@{dmcr.digests[B]}"), str(tmp_path / "b"))
            same_tree(dmcr.model, str(tmp_path / "b"))
            with pytest.raises(ModelPackError):
                RegistryClient(ro.host, ca_bundle=str(tmp_path / "ca.crt"), username=PULL_USER,
                               password="guess", retries=0).get_manifest(
                    parse(f"{ro.host}/{B}@{dmcr.digests[B]}"))
    finally:
        realm.stop()
