"""controller/models/secretreader.py: a get per named Secret, a TTL, a re-check."""

from __future__ import annotations

from typing import Any

from controller.models.secretreader import SecretReader
from kube import client as kube


class FakeClient:
    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.gets: list[tuple[str, str]] = []

    def get(self, res: Any, name: str, namespace: str, **kw: Any) -> dict[str, Any]:
        assert res is kube.SECRETS
        self.gets.append((namespace, name))
        if (namespace, name) not in self.secrets:
            raise kube.NotFound("not found", status=404)
        return {"metadata": {"name": name, "namespace": namespace},
                "data": self.secrets[(namespace, name)]}


class Own:
    def __init__(self) -> None:
        self.asked: list[Any] = []

    def get(self, key: Any) -> dict[str, Any] | None:
        self.asked.append(key)
        return {"hashes": {}}


def test_own_namespace_from_the_watch_others_by_get_with_a_ttl() -> None:
    now = [0.0]
    c, own = FakeClient(), Own()
    r = SecretReader(c, "sys", own, ttl=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert r.get(("sys", "a")) == {"hashes": {}} and own.asked == [("sys", "a")] and not c.gets
    assert r.get(("t", "s")) is None                     # absent: None, remembered
    c.secrets[("t", "s")] = {"token": "djE="}
    assert r.get(("t", "s")) is None and c.gets == [("t", "s")]
    now[0] = 11.0
    got = r.get(("t", "s"))
    assert got is not None and set(got["hashes"]) == {"token"} and "djE=" not in str(got)


def test_recheck_reports_appeared_changed_and_gone_secrets() -> None:
    c = FakeClient()
    r = SecretReader(c, "sys", Own())  # type: ignore[arg-type]
    c.secrets[("t", "a")] = {"token": "djE="}
    r.get(("t", "a"))
    r.get(("t", "b"))                                    # missing for now
    assert r.recheck([("t", "a"), ("t", "b"), ("t", "never-read")]) == []
    c.secrets[("t", "a")] = {"token": "djI="}
    c.secrets[("t", "b")] = {"token": "djE="}
    assert sorted(r.recheck([("t", "a"), ("t", "b")])) == [("t", "a"), ("t", "b")]
    assert r.recheck([("t", "a"), ("t", "b")]) == []
    del c.secrets[("t", "a")]
    assert r.recheck([("t", "a")]) == [("t", "a")]
    c.gets.clear()
    assert r.recheck([("sys", "x")]) == [] and not c.gets  # own namespace: the watch's job
