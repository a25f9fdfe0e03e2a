"""The CSI Identity service: name, capabilities, and a Probe that never waits.

Probe only reads a flag set once the cache has recovered: it takes no lock
the cache or a publish holds, so a node busy pulling a large model still
answers the livenessprobe sidecar at once. node-driver-registrar gives
GetPluginInfo one second; it is a constant.
"""

from __future__ import annotations

import asyncio
from importlib import metadata
from typing import Any

from api import names
from csi.stubs import pb, rpc

DRIVER_NAME = names.CSI_DRIVER  # the CSIDriver object's name, which pods' volumes name


def _version() -> str:
    try:
        return metadata.version("modelcache")
    except metadata.PackageNotFoundError:
        return "0.0.0-dev"


class IdentityService(rpc.IdentityServicer):  # type: ignore[misc,name-defined]
    def __init__(self, ready: asyncio.Event) -> None:
        self.ready = ready
        self.version = _version()

    async def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=self.version)

    async def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        # Node service only: no CONTROLLER_SERVICE, no topology constraints.
        return pb.GetPluginCapabilitiesResponse(capabilities=[])

    async def Probe(self, request: Any, context: Any) -> Any:
        resp = pb.ProbeResponse()
        resp.ready.value = self.ready.is_set()
        return resp
