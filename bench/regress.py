"""bench/regress: the before/after run issue #17 asks for, in one command.

"Nothing here may regress the existing figures (pull, publish, ingest,
controller)": this checks out the tree before issue 17 (``--ref``, default
867cc33; publish's default is d489c6a, see BEFORE_REF_FOR) as a throwaway
``git worktree`` (the main worktree is untouched; the worktree is removed
at the end, also on failure or Ctrl-C), then runs each bench from the
before tree and from this tree, interleaved (before,
after, before, after, ... ``--runs`` times), each as its own process with
``cwd`` and ``PYTHONPATH`` set to its tree so it measures that tree's code
(``modelcache`` on PATH is an editable install whose finder comes after
``PYTHONPATH``, checked before the first run). It reads each bench's
headline figures from its own markdown output and prints one table of
medians, ready to paste into bench/RESULTS.md, with /proc/loadavg at the
start and at the end.

The four benches' printed output is the same in both trees (their code did
not change after 867cc33), so both are parsed from that human output with
tolerant regexes (a number and its unit, located by the row's label); a
bench whose output no longer matches fails loudly with its name rather
than reporting a wrong figure. Sizes are the benches' own flags, chosen so
the whole run (``--runs 2``) takes about ten minutes on 2 quiet cores;
``--quick`` uses the smallest sizes (development, a busy machine).

    python3 -m bench.regress [--ref 867cc33] [--ref-for publish=d489c6a] [--runs 2]
                             [--quick] [--only pull,publish,ingest,controller] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE_REF = "867cc33"
# 867cc33's node plugin cannot pull: its csi/main.py passes RegistryClient(ranges=)
# (issue-17 WIP committed in 6879131) while the registry.py half came only in
# e642709, so every cold NodePublish fails with a TypeError. publish's before
# tree is therefore 6879131's parent, the last commit without issue-17 work.
BEFORE_REF_FOR = {"publish": "d489c6a"}
NUM = r"([0-9]+(?:\.[0-9]+)?)"


class ParseError(Exception):
    """A bench's output did not contain a figure where its label says it is."""


@dataclass(frozen=True)
class Figure:
    """One headline figure of one bench run; ``higher_better`` gives the good direction."""

    name: str
    value: float
    higher_better: bool = False


@dataclass(frozen=True)
class Bench:
    """How to run one bench at each size and read its headline figures."""

    name: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    parse: Callable[[str], list[Figure]]


@dataclass
class Outcome:
    """Every run's figures of one bench in one tree, and how many runs failed."""

    runs: list[list[Figure]] = field(default_factory=list)
    failed: int = 0


def _search(pattern: str, text: str, what: str) -> re.Match[str]:
    m = re.search(pattern, text, re.MULTILINE)
    if m is None:
        raise ParseError(f"no {what} in the output")
    return m


def _rows(text: str) -> dict[str, str]:
    """The two-column markdown rows ``| label | value |`` of a bench's output."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def _numbers(rows: dict[str, str], prefix: str, count: int) -> list[float]:
    """The first ``count`` numbers of the row whose label starts with ``prefix``."""
    for label, value in rows.items():
        if label.startswith(prefix):
            nums = [float(x) for x in re.findall(NUM, value)]
            if len(nums) >= count:
                return nums[:count]
    raise ParseError(f"no row {prefix!r} with {count} numbers in the output")


def parse_pull(text: str) -> list[Figure]:
    """bench/pull/run.py: our pull's wall time and rate, its share of the limit, its CPU."""
    wall = _search(rf"^\|\s*modelcache pull\s*\|\s*{NUM}\s*\|\s*{NUM}\s*\|\s*{NUM} GB/s",
                   text, "modelcache pull row")
    share = _search(rf"modelcache pull \(verified, on disk\) = {NUM} GB/s: {NUM} % of the raw",
                    text, "share of the raw limit")
    used = _search(r"^\|\s*modelcache pull\s*\|" + rf"\s*{NUM}\s*\|" * 5, text,
                   "modelcache pull CPU row")
    floor = _search(rf"^unavoidable CPU .*= {NUM} CPU-s;", text, "CPU floor")
    client, registry = float(used[4]), float(used[5])
    return [
        Figure("wall until on disk, s", float(wall[2])),
        Figure("throughput on disk, GB/s", float(wall[3]), higher_better=True),
        Figure("% of the raw limit (same run)", float(share[2]), higher_better=True),
        Figure("client CPU-s", client),
        Figure("registry CPU-s while serving it", registry),
        # CPU-seconds barely move with other load, so this is the steadiest figure
        Figure("(client + registry) CPU / floor CPU", (client + registry) / float(floor[1])),
    ]


def parse_publish(text: str) -> list[Figure]:
    """bench/publish/run.py: warm publish latency and CPU, cold publish time, × `cp -r`."""
    rows = _rows(text)
    p50_1, p99_1 = _numbers(rows, "warm publish p50 / p99, 1 at a time", 2)
    p50_50, p99_50 = _numbers(rows, "warm publish p50 / p99, 50 concurrent", 2)
    cpu_1, cpu_50 = _numbers(rows, "plugin CPU per warm publish", 2)
    return [
        Figure("warm p50, 1 at a time, ms", p50_1),
        Figure("warm p99, 1 at a time, ms", p99_1),
        Figure("warm p50, 50 concurrent, ms", p50_50),
        Figure("warm p99, 50 concurrent, ms", p99_50),
        Figure("plugin CPU per warm publish, 1 at a time, ms", cpu_1),
        Figure("plugin CPU per warm publish, 50 concurrent, ms", cpu_50),
        Figure("cold publish, s", _numbers(rows, "cold publish", 1)[0]),
        Figure("`cp -r` / warm p50", _numbers(rows, "cp -r / warm publish p50", 1)[0],
               higher_better=True),
    ]


def parse_ingest(text: str) -> list[Figure]:
    """bench/ingest/run.py: our ingest's wall time and RSS, and against huggingface_hub."""
    ours = _search(rf"^\|\s*ours:.*\|\s*{NUM} s\s*\|\s*{NUM} MiB", text, "ours row")
    theirs = _search(rf"^\|\s*theirs:.*\|\s*{NUM} s\s*\|", text, "theirs row")
    ratio = _search(rf"ours / theirs wall time: \**{NUM}×", text, "ours / theirs ratio")
    return [
        Figure("ours: wall, s", float(ours[1])),
        Figure("ours: peak RSS, MiB", float(ours[2])),
        # theirs is the same code in both trees: its drift is the machine's
        Figure("theirs (same code both sides): wall, s", float(theirs[1])),
        Figure("ours / theirs wall", float(ratio[1])),
    ]


def parse_controller(text: str) -> list[Figure]:
    """bench/controller/run.py: create→Job latency, the create rate it saw, the manager's RSS."""
    rows = _rows(text)
    p50, p99 = _numbers(rows, "create→Job p50 / p99", 2)
    seen, total = _numbers(rows, "Jobs seen", 2)
    if seen < total:
        raise ParseError(f"only {seen:.0f} of {total:.0f} Jobs seen: latencies would be partial")
    return [
        Figure("create→Job p50, ms", p50),
        Figure("create→Job p99, ms", p99),
        Figure("creates admitted, /s", _numbers(rows, "models", 3)[2], higher_better=True),
        Figure("manager peak RSS, MiB", _numbers(rows, "manager peak RSS", 1)[0]),
    ]


BENCHES = [
    Bench("pull", ("-m", "bench.pull.run", "--size-gib", "1", "--files", "8", "--runs", "3",
                   "--no-peers"),
          ("-m", "bench.pull.run", "--size-gib", "0.25", "--files", "4", "--runs", "1",
           "--no-peers"), parse_pull),
    Bench("publish", ("-m", "bench.publish.run", "--size-mib", "512", "--files", "10",
                      "--rounds", "10", "--serial", "200"),
          ("-m", "bench.publish.run", "--size-mib", "128", "--files", "4", "--rounds", "2",
           "--serial", "40"), parse_publish),
    Bench("ingest", ("-m", "bench.ingest.run", "--size-mib", "1024", "--runs", "1"),
          ("-m", "bench.ingest.run", "--size-mib", "256", "--runs", "1"), parse_ingest),
    Bench("controller (burst)", ("-m", "bench.controller.run", "--models", "1000"),
          ("-m", "bench.controller.run", "--models", "200"), parse_controller),
    Bench("controller (paced 50/s)", ("-m", "bench.controller.run", "--models", "500",
                                      "--rate", "50"),
          ("-m", "bench.controller.run", "--models", "100", "--rate", "50"), parse_controller),
]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@contextlib.contextmanager
def worktree(repo: str, ref: str) -> Iterator[str]:
    """A detached checkout of ``ref`` in a temp dir, removed (and pruned) however we leave."""
    parent = tempfile.mkdtemp(prefix="modelcache-regress-")
    path = os.path.join(parent, ref.replace("/", "_"))
    try:
        subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "--quiet", path, ref],
                       check=True, capture_output=True, text=True)
        yield path
    finally:
        removed = subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", path],
                                 capture_output=True, text=True)
        shutil.rmtree(parent, ignore_errors=True)
        if removed.returncode != 0:  # never added, or half added: drop its record
            subprocess.run(["git", "-C", repo, "worktree", "prune"], capture_output=True)


def tree_env(tree: str) -> dict[str, str]:
    """The environment that makes a bench import ``tree``'s packages and nothing else's."""
    return {**os.environ, "PYTHONPATH": tree}


def prepare(tree: str) -> None:
    """Byte-compile ``tree``, build its gRPC stubs, check it imports itself.

    A fresh worktree has no ``__pycache__`` and no csi/gen: without this its
    first runs would pay for compiling every module and running protoc, costs
    the other tree's runs do not pay. (compileall's status is not checked: a
    file that does not compile fails the import check or the bench itself.)
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-x", r"/\.", tree],
                   capture_output=True)
    check_imports(tree)


def check_imports(tree: str) -> None:
    """Fail before any run if ``tree``'s bench would import another tree's code."""
    code = ("import bench, cli, csi, ingest, controller\n"
            "from csi import stubs\n"
            "stubs.load()\n"
            "for m in (bench, cli, csi, ingest, controller, stubs): print(m.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=tree_env(tree),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: cannot import its packages:\n{proc.stderr[-2000:]}")
    root = os.path.realpath(tree) + os.sep
    for path in proc.stdout.split():
        if not os.path.realpath(path).startswith(root):
            raise SystemExit(f"{tree}: imports {path}, not its own tree")


def bench_argv(bench: Bench, quick: bool, scratch: str) -> list[str]:
    """The bench's command line; ingest writes its section to scratch, not to RESULTS.md."""
    argv = [sys.executable, *(bench.quick if quick else bench.full)]
    if "bench.ingest.run" in argv:
        argv += ["--results", os.path.join(scratch, "ingest-results.md")]
    return argv


def run_one(bench: Bench, tree: str, argv: list[str], timeout: float,
            log: str) -> list[Figure] | None:
    """Run one bench in ``tree``; its figures, or None (and why, on stderr) if it failed."""
    text, rc = run_group(argv, tree, timeout)
    with open(log, "w") as f:
        f.write(text)
    try:
        if rc != 0:
            raise ParseError(f"exit status {rc}")
        return bench.parse(text)
    except ParseError as e:
        print(f"  {bench.name} failed in {tree}: {e}; output in {log}", file=sys.stderr)
        return None


def run_group(argv: list[str], tree: str, timeout: float) -> tuple[str, int]:
    """(output, exit status) of ``argv`` run in ``tree`` as its own process group.

    On a timeout or our own Ctrl-C the whole group gets SIGINT first: the
    benches clean up in ``finally`` (registries, the node plugin and its
    mounts, etcd and the API server), which a SIGKILL of the bench alone
    would leave running.
    """
    proc = subprocess.Popen(argv, cwd=tree, env=tree_env(tree), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_sigint_default)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out, proc.returncode
    except subprocess.TimeoutExpired:
        return f"{_stop(proc)}\n(timed out after {timeout:.0f} s)", -1
    except BaseException:
        _stop(proc)
        raise


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default. A job started in the
    background by a non-interactive shell (``cmd &``, as CI may run us) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler: the bench would
    never run its clean-up."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGINT the process group, SIGKILL it if still there after 30 s; what it wrote."""
    for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.communicate(timeout=grace)[0] or ""
        except subprocess.TimeoutExpired:
            continue
    return ""


def _fmt(v: float) -> str:
    """Three significant digits or so: the runs' noise is larger than that."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _medians(outcome: Outcome) -> dict[str, tuple[float, bool]]:
    """Each figure's median over the runs that produced it, with its good direction."""
    values: dict[str, list[float]] = {}
    better: dict[str, bool] = {}
    for run in outcome.runs:
        for fig in run:
            values.setdefault(fig.name, []).append(fig.value)
            better[fig.name] = fig.higher_better
    return {k: (statistics.median(v), better[k]) for k, v in values.items()}


def table(results: dict[str, tuple[Outcome, Outcome]]) -> str:
    """The markdown table of medians: bench, figure, before, after, after/before."""
    lines = ["| bench | figure | before (median) | after (median) | after/before |",
             "|---|---|---:|---:|---:|"]
    for name, (before, after) in results.items():
        b, a = _medians(before), _medians(after)
        for fig in dict.fromkeys([*b, *a]):
            higher = (b.get(fig) or a[fig])[1]
            cells = [_fmt(b[fig][0]) if fig in b else "–", _fmt(a[fig][0]) if fig in a else "–"]
            ratio = (f"{a[fig][0] / b[fig][0]:.2f}×" if fig in a and fig in b and b[fig][0]
                     else "–")
            lines.append(f"| {name} | {fig} {'↑' if higher else '↓'} | {cells[0]} | "
                         f"{cells[1]} | {ratio} |")
        for label, o in (("before", before), ("after", after)):
            if o.failed:
                lines.append(f"| {name} | runs failed ({label}) | | | {o.failed} of "
                             f"{o.failed + len(o.runs)} |")
    return "\n".join(lines)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def before_refs(benches: list[Bench], ref: str, overrides: list[str]) -> dict[str, str]:
    """Each bench's before ref: ``ref``, or BEFORE_REF_FOR's, or ``NAME=REF`` (empty: ``ref``)."""
    chosen = dict(BEFORE_REF_FOR)
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--ref-for {item!r}: expected NAME=REF")
        chosen[name.strip()] = value.strip()
    return {b.name: next((r for n, r in chosen.items() if b.name.startswith(n) and r), ref)
            for b in benches}


def run_all(benches: list[Bench], trees: dict[str, tuple[str, str]], runs: int, quick: bool,
            timeout: float, logs: str, scratch: str) -> dict[str, tuple[Outcome, Outcome]]:
    """Every bench ``runs`` times in its before tree and in this one, interleaved."""
    results = {b.name: (Outcome(), Outcome()) for b in benches}
    for i in range(runs):
        for b in benches:
            for side, (label, tree) in enumerate(zip(("before", "after"), trees[b.name],
                                                     strict=True)):
                slug = re.sub(r"[^a-z0-9]+", "-", b.name).strip("-")
                log = os.path.join(logs, f"{slug}-{label}-{i + 1}.log")
                t0 = time.monotonic()
                figs = run_one(b, tree, bench_argv(b, quick, scratch), timeout, log)
                print(f"run {i + 1} {b.name} {label}: {time.monotonic() - t0:.0f} s, "
                      f"load {loadavg()}", file=sys.stderr, flush=True)
                outcome = results[b.name][side]
                if figs is None:
                    outcome.failed += 1
                else:
                    outcome.runs.append(figs)
    return results


def describe(ref: str) -> str:
    """``ref`` as its short hash and the start of its subject."""
    short, _, subject = _git("log", "-1", "--format=%h %s", ref).partition(" ")
    return f"{short} ({subject[:50]}{'…' if len(subject) > 50 else ''})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=BEFORE_REF, help="the before tree (default %(default)s)")
    ap.add_argument("--ref-for", action="append", default=[], metavar="BENCH=REF",
                    help=f"another before tree for one bench (default {BEFORE_REF_FOR})")
    ap.add_argument("--runs", type=int, default=2, help="runs of each bench in each tree")
    ap.add_argument("--quick", action="store_true", help="smallest sizes (development)")
    ap.add_argument("--only", default="", help="comma-separated bench names (prefixes)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per bench run")
    ap.add_argument("--logs", default="", help="every run's output (default: a new temp dir)")
    args = ap.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    benches = [b for b in BENCHES if not only or any(b.name.startswith(o) for o in only)]
    if not benches:
        raise SystemExit(f"--only {args.only!r} names none of {[b.name for b in BENCHES]}")
    refs = before_refs(benches, args.ref, args.ref_for)
    logs = args.logs or tempfile.mkdtemp(prefix="modelcache-regress-logs-")
    os.makedirs(logs, exist_ok=True)
    started, load_start = time.monotonic(), loadavg()
    with tempfile.TemporaryDirectory(prefix="modelcache-regress-scratch-") as scratch, \
            contextlib.ExitStack() as stack:
        checkouts = {r: stack.enter_context(worktree(REPO, r))
                     for r in dict.fromkeys(refs.values())}
        for tree in [*checkouts.values(), REPO]:
            prepare(tree)
        trees = {b.name: (checkouts[refs[b.name]], REPO) for b in benches}
        results = run_all(benches, trees, args.runs, args.quick, args.timeout, logs, scratch)
    took = time.monotonic() - started
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    cmd = " ".join(["python3", "-m", "bench.regress", *sys.argv[1:]])
    print(f"\nbefore = {describe(args.ref)}; after = this tree "
          f"({_git('rev-parse', '--short', 'HEAD')}{' + uncommitted changes' if dirty else ''}). "
          f"`{cmd}`: each bench {args.runs}× per tree, interleaved; medians. "
          f"{os.cpu_count()} cores; load average (1/5/15 min) {load_start} at the start, "
          f"{loadavg()} at the end; {took / 60:.1f} min in all. Outputs: {logs}\n")
    print(table(results))
    print("\n↓ lower is better, ↑ higher is better. Bench commands (each tree's own bench):")
    for b in benches:
        other = f" (before = {describe(refs[b.name])})" if refs[b.name] != args.ref else ""
        print(f"- {b.name}{other}: `python3 {' '.join(b.quick if args.quick else b.full)}`")
    failed = sum(o.failed for pair in results.values() for o in pair)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
