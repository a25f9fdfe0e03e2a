"""Wiring: a grpc.aio server serving Identity and Node on a unix socket.

``create_server`` is the factory tests and ``main`` share. Recovery of the
cache runs after the socket is up (GetPluginInfo must answer within a
second of registration), and Probe reports not-ready until it is done.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import grpc

from csi.cache import Cache
from csi.identity import IdentityService
from csi.node import NodeService
from csi.resolvers.base import Resolver
from csi.stubs import rpc

log = logging.getLogger(__name__)


def socket_path(endpoint: str) -> str:
    """``unix:///csi/csi.sock`` (or a bare path) -> ``/csi/csi.sock``."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif "://" in endpoint:
        raise ValueError(f"only unix:// endpoints are supported, got {endpoint!r}")
    else:
        path = endpoint
    if not path.startswith("/"):
        raise ValueError(f"the socket path must be absolute: {endpoint!r}")
    return path


@dataclass
class Plugin:
    server: grpc.aio.Server
    node: NodeService
    identity: IdentityService
    cache: Cache
    socket: str

    async def recover(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.cache.recover)
        await loop.run_in_executor(None, self.node.recover)
        self.node.ready.set()
        log.info("ready", extra={"socket": self.socket})

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        self.node.records.close()
        self.cache.close()


async def create_server(endpoint: str, node_id: str, cache: Cache, resolver: Resolver,
                        max_wait: float = 110.0) -> Plugin:
    path = socket_path(endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)  # a stale socket from a previous run
    except FileNotFoundError:
        pass
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 << 20)])
    node = NodeService(node_id, cache, resolver, max_wait=max_wait)
    identity = IdentityService(node.ready)
    rpc.add_IdentityServicer_to_server(identity, server)
    rpc.add_NodeServicer_to_server(node, server)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    return Plugin(server, node, identity, cache, path)
