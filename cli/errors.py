"""The command line's error contract: one exception per exit code.

Where it sits: below every command module; ``cli/main.py`` turns these (and
the lower layers' own errors) into the exit codes of ``EXIT_CODES`` and one
line ``modelcache: REASON: message`` on stderr.
"""

from __future__ import annotations

OK = 0
FAILURE = 1  # the command ran and failed: a refused input, an unreachable server, a Model
USAGE = 2  # the command could not start: bad arguments, or something it needs is missing
INTERRUPTED = 130  # Ctrl-C; run the same command again to resume

# the table in ``modelcache --help`` and README ("Exit codes"); tests/integration/test_cli_exit.py
EXIT_CODES = """\
exit codes:
  0    done
  1    failed: one line "modelcache: REASON: message" on stderr (a refused input,
       an unreachable registry or API server, a Model that cannot take the command)
  2    usage: bad arguments, or something the command needs was neither given
       nor found (an upload session, a registry, a kubeconfig)
  130  interrupted (Ctrl-C); run the same command again to resume
"""


class CommandError(Exception):
    """A command that stops with ``reason`` and exit code ``code``."""

    code = FAILURE

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UsageError(CommandError):
    """Something the command needs was neither given nor found: exit 2."""

    code = USAGE
