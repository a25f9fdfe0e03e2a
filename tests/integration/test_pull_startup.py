"""``modelcache pull`` starts light: oras-py (and jsonschema), tqdm and the demo's
modules are imported only when needed. A real pull from the real registry, in a
fresh interpreter, then a look at ``sys.modules``; and the demo still parses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cli.local import registry as localregistry
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry

LAZY = ("oras", "jsonschema", "tqdm", "cli.demo", "cli.local.cluster")

PULL = """
import json, sys
from cli.main import main
rc = main(["pull", sys.argv[1], sys.argv[2], "--no-progress"])
print(json.dumps({"rc": rc, "loaded": [m for m in sys.argv[3:] if m in sys.modules]}))
"""


def _run(code: str, *args: str, home: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_CONFIG"}
    env["HOME"] = home  # no ~/.docker/config.json: nothing asks for oras-py
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))


def test_anonymous_pull_imports_neither_oras_nor_tqdm_nor_the_demo(registry, client,
                                                                    small_model, tmp_path):
    ref = f"{registry.host}/startup/m:v1"
    pack_to_registry(small_model, client, parse(ref))
    dest = tmp_path / "out"
    p = _run(PULL, ref, str(dest), *LAZY, home=str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"rc": 0, "loaded": []}
    assert sorted(os.listdir(dest)) == sorted(os.listdir(small_model))


def test_demo_flags_still_parse():
    code = ("from cli.main import build_parser; import sys; "
            "a = build_parser(with_demo='demo' in sys.argv[1:]).parse_args(sys.argv[1:]); "
            "print(a.keep, a.work_dir)")
    p = _run(code, "demo", "--once", "--work-dir", "/tmp/x", home="/nonexistent")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "/tmp/x"]


def test_basic_auth_client_defers_oras_until_a_challenge(small_model, tmp_path):
    # htpasswd answers Basic up front: the whole push and pull run without oras-py
    with localregistry.running(username="u", password="pw") as reg:
        c = RegistryClient(reg.host, insecure=True, username="u", password="pw")
        res = pack_to_registry(small_model, c, parse(f"{reg.host}/b/m:v1"))
        assert c.blob_exists("b/m", res.pack.layers[0].digest)
        assert c._registry is None
