"""The mirror configuration: containerd's hosts.toml semantics (``modelpack.oci.mirrors``)."""

from __future__ import annotations

import os
import re

import pytest

from modelpack.errors import FormatError
from modelpack.oci import mirrors
from modelpack.oci.registry import RegistryClient


def test_paths_follow_containerd():
    assert mirrors.mirror("http://127.0.0.1:65001").base == "http://127.0.0.1:65001"
    m = mirrors.mirror("https://mirror.example/cache")
    assert (m.base, m.repo_prefix) == ("https://mirror.example/cache", "")
    m = mirrors.mirror("https://harbor.example/v2/proxy-dmcr", override_path=True)
    assert (m.base, m.repo_prefix) == ("https://harbor.example", "proxy-dmcr/")
    with pytest.raises(FormatError):
        mirrors.mirror("https://x.example/api", override_path=True)
    with pytest.raises(FormatError):
        mirrors.mirror("ftp://x.example")


def test_hosts_toml_fields_and_order():
    text = '''
server = "https://dmcr.example"
[host."http://127.0.0.1:65001"]
  capabilities = ["pull", "resolve"]
  [host."http://127.0.0.1:65001".header]
    X-Dragonfly-Registry = ["https://dmcr.example"]
[host."https://push-only.example"]
  capabilities = ["push"]
[host."https://harbor.example/v2/proxy"]
  capabilities = ["pull"]
  override_path = true
  skip_verify = true
  ca = "/etc/ca.pem"
'''
    ms = mirrors.parse_hosts_toml(text)
    assert [m.url for m in ms] == ["http://127.0.0.1:65001", "https://harbor.example/v2/proxy"]
    assert ms[0].headers == (("X-Dragonfly-Registry", "https://dmcr.example"),)
    assert ms[1].capabilities == frozenset({"pull"}) and ms[1].skip_verify
    assert ms[1].ca == "/etc/ca.pem" and ms[1].repo_prefix == "proxy/"


def test_directory_then_flags_and_default(tmp_path):
    (tmp_path / "dmcr:5000").mkdir()
    (tmp_path / "dmcr:5000" / "hosts.toml").write_text('[host."http://a:1"]\n')
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."http://d:1"]\n')
    cfg = mirrors.load(str(tmp_path), ["dmcr:5000=http://b:2"])
    assert [m.url for m in cfg.of("dmcr:5000")] == ["http://a:1", "http://b:2"]
    assert [m.url for m in cfg.of("other:1")] == ["http://d:1"]
    with pytest.raises(FormatError):
        mirrors.load(flags=["no-equals"])


def test_attach_sends_no_registry_credentials():
    cfg = mirrors.load(flags=["dmcr:5000=https://m.example"])
    client = cfg.attach(RegistryClient("dmcr:5000", username="u", password="p"))
    assert client.mirrors is not None
    (mc,) = client.mirrors._clients
    assert mc.base == "https://m.example" and mc._basic is None and not mc._bearer()
    assert mc.session.params == {"ns": "dmcr:5000"}
    assert mirrors.load().attach(RegistryClient("dmcr:5000")).mirrors is None


def test_node_plugin_keys_mirrors_by_the_host_references_name():
    from csi.main import Clients

    cfg = mirrors.load(flags=["dmcr.ns.svc:5000=http://127.0.0.1:65001"])
    clients = Clients([], None, pull_via={"dmcr.ns.svc:5000": "dmcr.ns.svc:5002"},
                      credentials=("u", "p"), mirrors=cfg)
    client = clients("dmcr.ns.svc:5000")
    assert client.host == "dmcr.ns.svc:5002" and client.mirrors is not None
    (mc,) = client.mirrors._clients
    assert mc.session.params == {"ns": "dmcr.ns.svc:5000"} and mc._basic is None


def test_the_admin_guides_mirror_examples_parse_as_described():
    """docs/admin-guide.md's Dragonfly, Spegel and Harbor hosts.toml examples."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "admin-guide.md")) as f:
        blocks = re.findall(r"^```toml\n(.*?)^```$", f.read(), re.S | re.M)
    by_name = {b.splitlines()[0].split(":")[0].lstrip("# "): b for b in blocks}
    assert set(by_name) >= {"Dragonfly", "Spegel", "Harbor"}
    (dragonfly,) = mirrors.parse_hosts_toml(by_name["Dragonfly"])
    assert dragonfly.base == "http://127.0.0.1:65001" and dragonfly.forward_credentials
    assert dict(dragonfly.headers)["X-Dragonfly-Registry"].startswith("https://dmcr.")
    (spegel,) = mirrors.parse_hosts_toml(by_name["Spegel"])
    assert spegel.base == "http://localhost:30020" and not spegel.forward_credentials
    (harbor,) = mirrors.parse_hosts_toml(by_name["Harbor"])
    assert (harbor.base, harbor.repo_prefix) == ("https://harbor.example.com", "dmcr-proxy/")
    assert harbor.ca == "/etc/modelcache/certs.d/harbor-ca.crt"
