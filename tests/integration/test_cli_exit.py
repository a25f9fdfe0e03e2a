"""The exit-code table of ``modelcache`` (cli/errors.py), command by command.

Usage errors (argparse's, and a command's own "missing" ones) exit 2; a
command that ran and failed exits 1 with exactly one line ``modelcache:
REASON: message``; ``--help`` shows the table README shows. Each command is
run as a process, as a script would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli.errors import EXIT_CODES
from tests.integration.test_controller import REPO_ROOT

COMMANDS = ("pack", "pull", "inspect", "upload", "export", "import", "demo")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_help_shows_the_exit_code_table():
    p = run("--help")
    assert p.returncode == 0
    assert EXIT_CODES.strip() in p.stdout
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    for line in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert line in readme, line


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_errors_exit_2(command):
    p = run(command, "--no-such-flag")
    assert p.returncode == 2, p.stderr
    # argparse names the subcommand, or (for an unknown flag after a complete one) the top
    assert "usage: modelcache" in p.stderr
    assert "unrecognized arguments: --no-such-flag" in p.stderr or "error:" in p.stderr


def test_no_command_and_missing_arguments_exit_2():
    assert run().returncode == 2
    for args in (("pack", "./m"), ("pull", "r/x:v1"), ("export", "m"), ("upload", "m")):
        p = run(*args)
        assert p.returncode == 2 and "error:" in p.stderr, (args, p.stderr)


@pytest.fixture
def dead_kubeconfig(tmp_path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text("""apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
""")
    return str(path)


def failures(tmp_path, kubeconfig: str) -> list[tuple[str, tuple[str, ...]]]:
    gone = str(tmp_path / "gone")
    return [
        ("pack", ("pack", gone, "--output", str(tmp_path / "oci"))),
        ("pull", ("pull", "127.0.0.1:1/x/y:v1", str(tmp_path / "d"))),
        ("inspect", ("inspect", gone)),
        ("upload", ("upload", "m", gone, "--url", "http://127.0.0.1:1/v1/uploads/x")),
        ("export", ("export", "m", "-o", str(tmp_path / "x.tar"), "--kubeconfig", kubeconfig)),
        ("import", ("import", gone, "--registry", "127.0.0.1:1", "--kubeconfig", kubeconfig)),
    ]


def test_runtime_failures_exit_1_with_one_line(tmp_path, dead_kubeconfig):
    for command, args in failures(tmp_path, dead_kubeconfig):
        p = run(*args, env={"MODELCACHE_UPLOAD_TOKEN": "t"})
        assert p.returncode == 1, (command, p.returncode, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("modelcache: "), (command,
                                                                                    p.stderr)
        reason = p.stderr.split(": ", 2)[1]
        assert reason.isidentifier() and reason[0].isupper(), (command, p.stderr)


def test_what_is_missing_exits_2(tmp_path):
    no_kube = {"KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}
    for args, reason in ((("upload", "m", "."), "KubeconfigError"),
                         (("export", "m", "-o", str(tmp_path / "x.tar")), "KubeconfigError"),
                         (("import", str(tmp_path / "b.tar")), "KubeconfigError"),
                         (("upload", "m", ".", "--url", "http://127.0.0.1:1/v1/uploads/x"),
                          "MissingUploadToken")):
        p = run(*args, env={**no_kube, "MODELCACHE_UPLOAD_TOKEN": ""})
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"modelcache: {reason}: ")


LOG_THEN_EXIT = """
import logging, os, sys
from kube import logs
stop = logs.setup("info", "text")
for i in range(5000):
    logging.getLogger("t").info("line %d", i)
if sys.argv[1] == "stop":
    stop()
    stop()  # at most once: a second call (and the one at exit) does nothing
os._exit(0)
"""


def test_stop_writes_every_queued_log_line_before_a_quick_exit():
    # the CLI ends with os._exit (cli.main.run): without the writer's stop first,
    # lines still queued are lost
    def lines(mode: str) -> int:
        p = subprocess.run([sys.executable, "-c", LOG_THEN_EXIT, mode], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return sum(" line " in x for x in p.stderr.splitlines())

    assert lines("stop") == 5000
    assert lines("no-stop") < 5000


def test_the_quick_exit_keeps_the_code_the_logs_and_the_failure_line(tmp_path):
    # run() is the installed command; its logs (-v) and its one failure line come out,
    # in that order, and the exit code is main's
    p = subprocess.run([sys.executable, "-c", "from cli.main import run; run()", "-v", "pull",
                        "127.0.0.1:1/x/y:v1", str(tmp_path / "out"), "--insecure"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip().splitlines()
    assert sum("INFO modelpack.oci.registry retrying" in x for x in err) >= 1, p.stderr
    assert err[-1].startswith("modelcache: RegistryUnavailable: "), p.stderr
    help_ = subprocess.run([sys.executable, "-c", "from cli.main import run; run()", "--help"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and EXIT_CODES.strip() in help_.stdout
