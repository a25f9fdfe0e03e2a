"""Every shell block of the user-facing docs, run as written against the demo's system.

Where it sits: the docs' own test. README.md, docs/user-guide.md,
docs/catalog.md and examples/README.md are parsed; every fenced block
labelled ``bash``, ``sh``, ``shell`` or ``console`` either runs here, in a
real bash, against the demo's system (tests/integration/demoenv.py:
kube-apiserver, DMCR, the local hub serving all-MiniLM-L6-v2, the upload
gateway, the controller manager with its admission webhook registered), or
is preceded in the doc by a visible ``<!-- cluster-only: REASON -->`` (it
needs a real cluster; REASON names what runs it) or ``<!-- not-run: REASON
-->`` (the quick start itself: the demo and the suite, run by test_demo.py
and CI). An unmarked block that fails here fails the test; so does an
unlabelled block holding ``$ `` commands (label it ``console``).

How a block is read:
- ``console``: a line ``$ CMD`` is a command (a heredoc continues it up to
  its terminator); the lines after it, up to the next ``$``, are the output
  the doc shows, each checked below.
- ``bash``/``sh``/``shell``: each line is a command (a trailing ``\\`` or a
  heredoc continues it); a trailing ``# → TEXT`` is output the doc shows. A
  ``text`` block right after the block is output of its last command.
- ``# exits N`` at the end of a command's first (logical) line: the exit status the
  doc promises (else 0).
- Shown output is matched as a pattern: whitespace runs match any
  whitespace and ``…`` matches anything, so only the stable parts count.
- A ``yaml`` block whose first line is ``# save as: NAME`` is a file the doc
  asks the user to save: it is written as NAME when the doc reaches it.

What the test substitutes, as a user would, and nothing else:
- ``export KUBECONFIG=…``: the path the demo printed, i.e. the system's
  kubeconfig (it is also in the environment of every block, as after
  README's export);
- the working directory is a scratch copy of the repository root (one
  symlink per top-level entry), so files the doc has the user save do not
  land in the checkout; it holds ``my-model/``, the user's own model files
  (a small generated safetensors model) that the upload commands send;
- ``PATH`` starts with the directory of the demo's kubectl, as README's
  PATH line sets it, and a ``modelcache`` that runs this checkout's CLI
  (what ``pip install -e .`` in hack/install.sh puts on PATH; the one
  installed on a test machine may come from another checkout).
Each doc runs in one bash process, its blocks in order, so an export in
one block holds for the next, as in a user's terminal.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from cli.local import cluster as localcluster
from cli.local.system import LocalSystem
from tests import modelgen
from tests.integration import demoenv

DOCS = ("README.md", "docs/user-guide.md", "docs/catalog.md", "examples/README.md")
SHELL = {"bash", "sh", "shell", "console"}
MARK = re.compile(r"^<!--\s*(cluster-only|not-run):\s*(\S.*?)\s*-->$")
SAVE = re.compile(r"^#\s*save as:\s*(\S+)\s*$")
TRAILER = re.compile(r"\s#\s+(?:exits (\d+))?\s*(?:→\s*(.*?))?\s*$")
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")
NS = "default"  # the demo's own namespace: the guide creates team-a itself


@dataclass
class Command:
    text: str
    rc: int = 0
    shows: list[str] = field(default_factory=list)  # output the doc shows


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    body: list[str]
    mark: tuple[str, str] | None = None  # (kind, reason)
    output: list[str] | None = None  # a text block right after it
    save_as: str | None = None

    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def commands(self) -> list[Command]:
        out: list[Command] = []
        lines = list(self.body)
        console = self.lang == "console"
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if console:
                if not line.startswith("$ "):
                    if out and line.strip():
                        out[-1].shows.append(line)
                    continue
                line = line[2:]
            elif not line.strip() or line.lstrip().startswith("#"):
                continue
            first = line
            text = [line]
            while text[-1].endswith("\\") and i < len(lines):
                text.append(lines[i])
                i += 1
            first = text[-1]  # a trailer ends the command's first logical line
            end = HEREDOC.search(first)
            if end:
                while i < len(lines):
                    text.append(lines[i])
                    i += 1
                    if text[-1].strip() == end.group(1):
                        break
            cmd = Command("\n".join(text))
            trailer = TRAILER.search(first)
            if trailer and (trailer.group(1) or trailer.group(2)):
                cmd.rc = int(trailer.group(1) or 0)
                if trailer.group(2):
                    cmd.shows.append(trailer.group(2))
            out.append(cmd)
        if out and self.output:
            out[-1].shows += [s for s in self.output if s.strip()]
        return out


def parse(doc: str) -> list[Block]:
    with open(os.path.join(localcluster.REPO_ROOT, doc)) as f:
        lines = f.read().splitlines()
    blocks: list[Block] = []
    i = 0
    last_text = ""  # the last non-blank line outside a block
    after_block: Block | None = None  # the block just closed, if only blank lines since
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("```"):
            if line.strip():
                last_text, after_block = line.strip(), None
            continue
        lang = line[3:].strip()
        start = i
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang == "text" and after_block is not None:
            after_block.output = body
            after_block = None
            continue
        mark = MARK.match(last_text)
        block = Block(doc, start, lang, body, (mark.group(1), mark.group(2)) if mark else None)
        if lang == "yaml" and body and SAVE.match(body[0]):
            block.save_as = SAVE.match(body[0]).group(1)  # type: ignore[union-attr]
        blocks.append(block)
        after_block = block if lang in SHELL else None
        last_text = ""
    return blocks


def pattern(shown: str) -> re.Pattern[str]:
    out, sep = "", False
    for tok in shown.split():
        if tok == "…":  # anything, whitespace around it included
            out, sep = out + ".*?", False
            continue
        out += (r"\s+" if sep else "") + ".*?".join(re.escape(p) for p in tok.split("…"))
        sep = True
    return re.compile(out)


# -- without a server ----------------------------------------------------------------


def test_every_shell_block_is_run_or_marked_with_a_reason() -> None:
    """What runs, what is marked and why; no unlabelled block of commands."""
    runs, marked = 0, []
    for doc in DOCS:
        for b in parse(doc):
            if b.lang == "" and any(ln.startswith("$ ") for ln in b.body):
                raise AssertionError(f"{b.where()}: commands in an unlabelled block: "
                                     "label it console")
            if b.lang not in SHELL:
                continue
            if b.mark:
                marked.append((b.where(), *b.mark))
            else:
                runs += 1
                assert b.commands(), f"{b.where()}: a shell block without a command"
    assert runs >= 5, runs
    kinds = {k for _, k, _ in marked}
    assert kinds <= {"cluster-only", "not-run"}
    for where, kind, reason in marked:
        # a reason names what runs the block instead
        assert re.search(r"test_\w+\.py|hack/\w+\.sh|CI", reason), (where, reason)
    not_run = [m for m in marked if m[1] == "not-run"]
    assert [w.split(":")[0] for w, _, _ in not_run] == ["README.md"], not_run


def test_the_parser_reads_commands_output_and_exit_codes() -> None:
    b = Block("x.md", 1, "console", [
        "$ kubectl apply -f bad.yaml   # exits 1",
        "The Model \"bad\" is invalid: …",
        "$ cat <<'EOF'", "a", "EOF", "$ echo ok"])
    cmds = b.commands()
    assert [c.rc for c in cmds] == [1, 0, 0]
    assert cmds[0].shows == ['The Model "bad" is invalid: …']
    assert cmds[1].text == "cat <<'EOF'\na\nEOF"
    b = Block("x.md", 1, "bash", ["# a comment", "kubectl get x \\", "  -o name   # → model/x",
                                   "export A=1  # the path the demo printed"])
    cmds = b.commands()
    assert [c.text for c in cmds] == ["kubectl get x \\\n  -o name   # → model/x",
                                      "export A=1  # the path the demo printed"]
    assert cmds[0].shows == ["model/x"] and cmds[1].shows == []
    assert pattern("minilm   Ready   100   Safetensors   …").search(
        "minilm   Ready      100        Safetensors   90868376   3s")
    assert not pattern("Ready").search("Failed")
    assert pattern("value: … exactly one").search("value: exactly one")


# -- against the demo's system -----------------------------------------------------------


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, minilm_dir: str) -> Iterator[LocalSystem]:
    with demoenv.running(str(tmp_path_factory.mktemp("docs") / "demo"), NS, minilm_dir) as s:
        yield s


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A scratch stand-in for the repository root, plus the user's own model files."""
    root = str(tmp_path_factory.mktemp("repo"))
    for name in os.listdir(localcluster.REPO_ROOT):
        if not name.startswith("."):
            os.symlink(os.path.join(localcluster.REPO_ROOT, name), os.path.join(root, name))
    modelgen.make_safetensors_model(os.path.join(root, "my-model"))
    os.mkdir(bin_dir(root))
    with open(os.path.join(bin_dir(root), "modelcache"), "w") as f:
        f.write(f"#!/bin/sh\nPYTHONPATH={shlex.quote(localcluster.REPO_ROOT)} "
                f"exec {shlex.quote(sys.executable)} -m cli.main \"$@\"\n")
    os.chmod(os.path.join(bin_dir(root), "modelcache"), 0o755)
    return root


def bin_dir(workdir: str) -> str:
    return os.path.join(workdir, ".bin")  # hidden: not one of the repository's entries


SEP = "@@modelcache-docs-rc="


def run_doc(s: LocalSystem, workdir: str, doc: str) -> int:
    """Runs the doc's unmarked shell blocks in one bash; returns how many commands ran."""
    assert s.cluster is not None
    script, cmds = [], []
    for b in parse(doc):
        if b.save_as:
            # the user saves the file when the doc shows it
            script.append(f"cat > {shlex.quote(b.save_as)} <<'@@EOF'\n"
                          + "\n".join(b.body) + "\n@@EOF")
        if b.lang not in SHELL or b.mark:
            continue
        for c in b.commands():
            text = re.sub(r"^export KUBECONFIG=.*$",
                          f"export KUBECONFIG={shlex.quote(s.cluster.kubeconfig)}",
                          c.text, flags=re.M)
            script.append(f"echo {SEP}start\n{text}\necho {SEP}$?")
            cmds.append((b, c))
    if not cmds:
        return 0
    kubectl_dir = os.path.dirname(localcluster.binaries().kubectl)
    env = {**os.environ, "KUBECONFIG": s.cluster.kubeconfig,
           "PATH": f"{kubectl_dir}:{bin_dir(workdir)}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=150)
    parts = re.split(re.escape(SEP) + r"start\n", res.stdout)[1:]
    assert len(parts) == len(cmds), f"{doc}: the shell stopped early:\n{res.stdout[-3000:]}"
    for (b, c), part in zip(cmds, parts, strict=True):
        got = re.search(re.escape(SEP) + r"(\d+)\n?$", part)
        assert got, f"{b.where()}: {c.text!r} did not finish:\n{part[-2000:]}"
        out = part[:got.start()]
        assert int(got.group(1)) == c.rc, \
            f"{b.where()}: {c.text!r} exited {got.group(1)}, the doc says {c.rc}:\n{out}"
        for shown in c.shows:
            assert pattern(shown).search(out), \
                f"{b.where()}: {c.text!r}: the doc shows {shown!r}, it printed:\n{out}"
    return len(cmds)


def test_readme(system: LocalSystem, workdir: str) -> None:
    assert run_doc(system, workdir, "README.md") >= 5


def test_user_guide(system: LocalSystem, workdir: str) -> None:
    assert run_doc(system, workdir, "docs/user-guide.md") >= 8


def test_catalog_and_examples_readme(system: LocalSystem, workdir: str) -> None:
    # both describe cluster objects and inline commands; any block they gain runs here
    for doc in ("docs/catalog.md", "examples/README.md"):
        run_doc(system, workdir, doc)
