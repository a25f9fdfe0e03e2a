"""A model's artifacts in the registry: found by repository, deleted on finalize.

Every tag of the model's repository and the digest its status names are
deleted by digest (the registry must have deletion enabled). Blobs are left
to the registry's garbage collector, which is how distribution reclaims
space. Registry errors leave as ``TemporaryError``: the finalizer stays and
the delete is retried with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controller.errors import TemporaryError
from modelpack.errors import ModelPackError, NotFoundError
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)


def delete_all(client: RegistryClient, repository: str, known: list[str]) -> list[str]:
    """Delete every manifest of ``repository`` (its tags and ``known`` digests)."""
    try:
        digests = [d for d in known if d]
        for tag in client.list_tags(repository):
            try:
                _, digest, _ = client.get_manifest(
                    reference.Reference(client.host, repository, tag))
            except NotFoundError:  # a tag listed while its manifest goes
                continue
            digests.append(digest)
        done = []
        for d in dict.fromkeys(digests):
            client.delete_manifest(repository, d)
            done.append(d)
        return done
    except ModelPackError as e:
        raise TemporaryError(f"deleting {repository} from the registry: {e}",
                             reason="RegistryError") from e


ClientFactory = Callable[[], RegistryClient]
