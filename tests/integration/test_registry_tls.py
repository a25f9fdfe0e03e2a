"""A registry on HTTPS with a private CA: ``RegistryClient(ca_bundle=…)`` must
verify against that CA even when ``$REQUESTS_CA_BUNDLE`` names another one
(requests lets the environment override a session's CA file otherwise)."""

from __future__ import annotations

import os

import pytest

from cli.local import cluster as localcluster
from cli.local import registry as localregistry
from modelpack.errors import ModelPackError
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_dir
from tests.servers.helpers import same_tree


def test_private_ca_wins_over_the_environment(tmp_path, small_model,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pki = localcluster.make_pki(str(tmp_path / "pki"))  # its serving cert names 127.0.0.1
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    with localregistry.running(root=str(tmp_path / "reg"),
                               tls=(pki.path("apiserver.crt"), pki.path("apiserver.key"))) as reg:
        client = RegistryClient(reg.host, ca_bundle=pki.ca)
        digest = pack_to_registry(small_model, client, parse(f"{reg.host}/tls/m:v1")).pack.digest
        dest = os.path.join(str(tmp_path), "out")
        pull_to_dir(client, parse(f"{reg.host}/tls/m@{digest}"), dest)
        same_tree(small_model, dest)
        with pytest.raises(ModelPackError):  # the system CAs do not know this registry
            RegistryClient(reg.host, retries=0).get_manifest(parse(f"{reg.host}/tls/m:v1"))
