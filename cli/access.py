"""Registry access for every command that talks to a registry: the flags and the client.

Credentials come from flags, the environment (MODELCACHE_REGISTRY_USERNAME /
MODELCACHE_REGISTRY_PASSWORD / MODELCACHE_REGISTRY_TOKEN) or
~/.docker/config.json (read by the client), never from a log. A loopback
registry is plain HTTP unless MODELCACHE_LOOPBACK_TLS=1.
"""

from __future__ import annotations

import argparse
import os
import sys

from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient


def client(args: argparse.Namespace, ref: Reference) -> RegistryClient:
    username = args.username or os.environ.get("MODELCACHE_REGISTRY_USERNAME")
    password = os.environ.get("MODELCACHE_REGISTRY_PASSWORD")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    token = os.environ.get("MODELCACHE_REGISTRY_TOKEN")
    insecure = args.insecure or ref.host.split(":")[0] in ("127.0.0.1", "localhost") and \
        os.environ.get("MODELCACHE_LOOPBACK_TLS") != "1"
    return RegistryClient(ref.host, insecure=insecure, username=username, password=password,
                          token=None if username else token, ca_bundle=args.ca_file)


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry access")
    g.add_argument("--insecure", action="store_true",
                   help="plain HTTP (loopback registries are plain HTTP by default)")
    g.add_argument("--ca-file", help="CA bundle to verify the registry's TLS certificate")
    g.add_argument("--username", help="basic-auth user (or MODELCACHE_REGISTRY_USERNAME)")
    g.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input (or MODELCACHE_REGISTRY_PASSWORD)")

