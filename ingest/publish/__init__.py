"""The publish worker: source → staged and verified → ModelPack in a registry.

``publish_uri`` is the entry the CLI (``modelcache pack SOURCE --push REF``)
and the Job use: it opens the source by URI, publishes it and reports
progress to a callback.
"""

from __future__ import annotations

from typing import Any

from ingest.publish.progress import Sink, delta_sink, json_lines, null_sink
from ingest.publish.worker import (
    Options,
    PublishError,
    PublishResult,
    default_work_dir,
    publish,
    publish_to_layout,
)
from ingest.sources import open_source
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient

__all__ = ["Options", "PublishError", "PublishResult", "Sink", "default_work_dir", "delta_sink",
           "json_lines", "null_sink", "publish", "publish_to_layout", "publish_uri"]


def publish_uri(uri: str, *, push: str | None = None, output: str | None = None,
                client: RegistryClient | None = None, insecure_registry: bool = False,
                progress: Sink = null_sink, work_dir: str | None = None,
                options: Options | None = None, **creds: Any) -> PublishResult:
    """Publish the model at ``uri`` to registry reference ``push`` or layout dir ``output``.

    ``progress`` receives event dicts (phase, bytesDone, bytesTotal, percent,
    bytesPerSecond, etaSeconds); ``creds`` go to ``open_source``.
    """
    if (push is None) == (output is None):
        raise ValueError("exactly one of push= or output= is needed")
    work_dir = work_dir or default_work_dir()
    source = open_source(uri, **creds)
    try:
        if output is not None:
            return publish_to_layout(source, output, work_dir=work_dir, sink=progress,
                                     options=options)
        assert push is not None
        ref = reference.parse(push)
        client = client or RegistryClient(ref.host, insecure=insecure_registry)
        return publish(source, client, ref, work_dir=work_dir, sink=progress, options=options)
    finally:
        source.close()
