"""Registry auth: bearer tokens (distribution's token mode with a real JWT
flow) and credentials from a docker config file."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest

from cli.local import registry as localregistry
from modelpack.errors import AuthError
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_dir, verify_tree
from tests.tokenauth import TokenServer


def test_bearer_token_realm(small_model, tmp_path):
    tokens = TokenServer(str(tmp_path), "bob", "hunter2")
    try:
        with localregistry.running(auth=tokens.registry_auth()) as reg:
            ref = parse(f"{reg.host}/team/model:v1")
            client = RegistryClient(reg.host, insecure=True, username="bob", password="hunter2")
            res = pack_to_registry(small_model, client, ref)
            assert tokens.issued >= 1
            pack = pull_to_dir(client, ref, str(tmp_path / "out"))
            assert pack.digest == res.pack.digest
            verify_tree(pack, str(tmp_path / "out"))
            with pytest.raises(AuthError):
                RegistryClient(reg.host, insecure=True, username="bob",
                               password="nope").get_manifest(ref)
    finally:
        tokens.close()


def test_credentials_from_docker_config(small_model, tmp_path):
    with localregistry.running(username="carol", password="pw") as reg:
        cfg_dir = tmp_path / "docker"
        cfg_dir.mkdir()
        auth = base64.b64encode(b"carol:pw").decode()
        (cfg_dir / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        env = {**os.environ, "DOCKER_CONFIG": str(cfg_dir), "HOME": str(tmp_path)}
        ref = f"{reg.host}/cfg/model:v1"
        p = subprocess.run(["modelcache", "pack", small_model, "--push", ref], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        env_none = {**os.environ, "HOME": str(tmp_path / "nohome"),
                    "DOCKER_CONFIG": str(tmp_path / "none")}
        p = subprocess.run(["modelcache", "inspect", ref], env=env_none,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and "Unauthorized" in p.stderr
        assert "pw" not in p.stderr.replace("pwd", "")
