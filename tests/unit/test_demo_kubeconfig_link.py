"""A kept demo links its kubeconfig at a fixed path (README's commands name it),
without taking the link from another demo that is still running."""

from __future__ import annotations

import os

from cli.demo import drop_link, stable_link


def test_link_is_made_kept_for_a_live_demo_and_replaced_when_dangling(tmp_path) -> None:
    link = str(tmp_path / "demo.kubeconfig")
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("a")
    second.write_text("b")
    assert stable_link(str(first), link)
    assert open(link).read() == "a"
    assert not stable_link(str(second), link)  # the first demo still runs: its link stays
    assert open(link).read() == "a"
    first.unlink()  # the first demo was killed: a dangling link is taken over
    assert stable_link(str(second), link)
    assert open(link).read() == "b"
    drop_link(str(first), link)  # not its link any more: left alone
    assert os.path.islink(link)
    drop_link(str(second), link)
    assert not os.path.lexists(link)


def test_a_plain_file_is_never_replaced(tmp_path) -> None:
    link = tmp_path / "demo.kubeconfig"
    link.write_text("mine")
    target = tmp_path / "k"
    target.write_text("k")
    assert not stable_link(str(target), str(link))
    assert link.read_text() == "mine"
