"""Fixtures for the source and publish tests; import them into a test module.

``hub`` is a Hugging Face Hub-compatible server (fresh knobs per test),
``ollama_registry`` a second docker-registry playing the Ollama registry,
``s3`` a versitygw server. Register with ``pytest_plugins``; helpers are in
``tests.servers.helpers``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cli.local import registry as localregistry
from modelpack.oci.registry import RegistryClient
from tests.servers import hfhub
from tests.servers import s3 as s3server


@pytest.fixture(scope="session")
def hub_server() -> Iterator[hfhub.HubServer]:
    with hfhub.HubServer(token="hf_test_token") as hub:
        yield hub


@pytest.fixture
def hub(hub_server: hfhub.HubServer) -> Iterator[hfhub.HubServer]:
    hub_server.knobs = hfhub.Knobs()
    hub_server.repos.clear()
    yield hub_server
    hub_server.knobs = hfhub.Knobs()


@pytest.fixture(scope="session")
def ollama_registry() -> Iterator[localregistry.LocalRegistry]:
    with localregistry.running() as reg:
        yield reg


@pytest.fixture(scope="session")
def ollama_client(ollama_registry: localregistry.LocalRegistry) -> RegistryClient:
    return RegistryClient(ollama_registry.host, insecure=True)


@pytest.fixture(scope="session")
def s3() -> Iterator[s3server.S3Server]:
    with s3server.running() as server:
        yield server


@pytest.fixture
def work_dir(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(str(tmp_path), "work")
