"""bench/regress.py: reading each bench's headline figures from its captured output,
the before/after table of medians, the per-bench before refs, and the throwaway git
worktree (gone afterwards, also when the body fails). The samples are real outputs of
the four benches (quick sizes, this machine), cut to the lines the parsers read plus
their neighbours.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import regress

PULL = """
### pull: 0.25 GiB in 4 files, median of 1 runs, 2 cores

| tool | wall s | until on disk (+sync) s | throughput (on disk) | ours ×faster (wall) | ours ×faster (on disk) |
|---|---:|---:|---:|---:|---:|
| modelcache pull | 0.45 | 0.47 | 0.59 GB/s | 1.00× | 1.00× |

| machine limit (same run) | throughput |
|---|---:|
| sha256, all cores | 1.57 GB/s |
| load average at the end | 5.45 |

network + hash limit = min(curl all at once, sha256 all cores) = 1.57 GB/s; raw limit = min(that, the disk's best write rate) = 1.57 GB/s.
modelcache pull (verified, on disk) = 0.59 GB/s: 38 % of the raw limit, 38 % of the network + hash limit

#### CPU budget (CPU-seconds = user + sys; of each, the run with the median CPU; 2 cores)

| work | wall s | client user s | client sys s | client CPU s | registry CPU s |
|---|---:|---:|---:|---:|---:|
| modelcache pull | 0.45 | 0.32 | 0.14 | 0.46 | 0.17 |
| `modelcache pull --help` (start-up + imports) | 0.15 | 0.13 | 0.02 | 0.15 | – |

unavoidable CPU for any verifying, durable client = registry serving 0.13 + receiving (curl) 0.09 + sha256 0.15 + O_DIRECT write 0.01 = 0.38 CPU-s; on 2 cores ≥ 0.19 s wall = at most 1.41 GB/s.
modelcache pull: 0.46 CPU-s (of which start-up ≈ 0.15) + registry 0.17 = 0.63 CPU-s → its own floor on 2 cores 0.31 s; measured 0.45 s wall.
"""

PUBLISH = """
`python3 -m bench.publish.run --size-mib 128 --files 4 --rounds 2 --serial 40`

| measure | value |
|---|---|
| model | 4 files, 128 MiB, placement hardlink |
| warm publish p50 / p99, 1 at a time | 1.0 ms / 1.7 ms (40 calls) |
| warm publish p50 / p99, 50 concurrent | 20.0 ms / 33.0 ms (100 calls, 2 rounds; per-round p99 25-33 ms) |
| plugin CPU per warm publish (all threads), 1 / 50 concurrent | 1.25 ms / 0.60 ms |
| NodeGetInfo p50 / p99, 50 concurrent (gRPC floor, same run) | 12.2 ms / 21.9 ms |
| `cp -r` of the model (median of 3) | 39 ms |
| cp -r / warm publish p50 (1 at a time) | 37x |
| cold publish (pull+verify+place+mount) | 0.35 s = 381 MB/s |
| oras-py `OrasClient.pull` of the same artifact | 0.33 s = 412 MB/s |
"""

INGEST = """run 1 theirs: 2.90 s, peak RSS 317 MiB  {"files": 9}
run 1 ours: 1.70 s, peak RSS 79 MiB  {"digest": "sha256:4bc1", "size": 268436222}
## ingest

| contender | wall time | peak RSS |
|---|---|---|
| theirs: `huggingface_hub.snapshot_download` + oras-py `push` | 2.90 s | 317 MiB |
| ours: `ingest.publish` (stage+hash once, verify, push) | 1.70 s | 79 MiB |

ours / theirs wall time: **0.59×** (goal ≤ 0.6×); our peak RSS
79 MiB (goal ≤ 300 MiB).
"""

CONTROLLER = """| arrivals | burst, 4 client threads as fast as admitted |
| models | 200 (created in 1.0 s, 197.1/s) |
| Jobs seen | 200 of 200; all within 1.4 s of the first create |
| create→Job p50 / p99 / max | 355 ms / 592 ms / 593 ms |
slowest: m-0140 593 ms, m-0167 592 ms
| Models in Publishing | 200 of 200 |
| Models with more than one Job | 0 |
| manager peak RSS (VmHWM) | 66 MiB (idle before the burst: 63 MiB) |
| manager workers | 8 |
"""


def values(figs: list[regress.Figure]) -> dict[str, float]:
    return {f.name: f.value for f in figs}


def test_pull_figures() -> None:
    got = values(regress.parse_pull(PULL))
    assert got["wall until on disk, s"] == 0.47  # the synced column, not the command's own
    assert got["throughput on disk, GB/s"] == 0.59
    assert got["% of the raw limit (same run)"] == 38
    assert got["client CPU-s"] == 0.46
    assert got["registry CPU-s while serving it"] == 0.17
    assert got["(client + registry) CPU / floor CPU"] == pytest.approx(0.63 / 0.38)


def test_publish_figures() -> None:
    got = values(regress.parse_publish(PUBLISH))
    assert got == {
        "warm p50, 1 at a time, ms": 1.0, "warm p99, 1 at a time, ms": 1.7,
        "warm p50, 50 concurrent, ms": 20.0, "warm p99, 50 concurrent, ms": 33.0,
        "plugin CPU per warm publish, 1 at a time, ms": 1.25,
        "plugin CPU per warm publish, 50 concurrent, ms": 0.60,
        "cold publish, s": 0.35, "`cp -r` / warm p50": 37}


def test_ingest_figures() -> None:
    got = values(regress.parse_ingest(INGEST))
    assert got == {"ours: wall, s": 1.70, "ours: peak RSS, MiB": 79,
                   "theirs (same code both sides): wall, s": 2.90, "ours / theirs wall": 0.59}


def test_controller_figures() -> None:
    got = values(regress.parse_controller(CONTROLLER))
    assert got == {"create→Job p50, ms": 355, "create→Job p99, ms": 592,
                   "creates admitted, /s": 197.1, "manager peak RSS, MiB": 66}


def test_controller_run_that_missed_jobs_is_not_a_figure() -> None:
    partial = CONTROLLER.replace("200 of 200; all", "150 of 200; all")
    with pytest.raises(regress.ParseError, match="150 of 200 Jobs"):
        regress.parse_controller(partial)


@pytest.mark.parametrize(("parse", "text", "cut"), [
    (regress.parse_pull, PULL, "| modelcache pull | 0.45 | 0.32"),
    (regress.parse_pull, PULL, "unavoidable CPU"),
    (regress.parse_publish, PUBLISH, "| cold publish"),
    (regress.parse_ingest, INGEST, "**0.59×**"),
    (regress.parse_controller, CONTROLLER, "| create→Job"),
])
def test_output_that_changed_shape_fails_instead_of_guessing(
        parse: Callable[[str], list[regress.Figure]], text: str, cut: str) -> None:
    broken = "\n".join(line for line in text.splitlines() if cut not in line)
    with pytest.raises(regress.ParseError):
        parse(broken)


def test_table_medians_ratio_direction_and_failures() -> None:
    def run(wall: float, rate: float) -> list[regress.Figure]:
        return [regress.Figure("wall, s", wall), regress.Figure("rate, GB/s", rate, True)]

    before = regress.Outcome(runs=[run(2.0, 1.0), run(4.0, 1.2), run(3.0, 5.0)])
    after = regress.Outcome(runs=[run(1.5, 2.4)], failed=1)
    lines = regress.table({"pull": (before, after)}).splitlines()
    assert lines[0] == "| bench | figure | before (median) | after (median) | after/before |"
    assert "| pull | wall, s ↓ | 3.00 | 1.50 | 0.50× |" in lines
    assert "| pull | rate, GB/s ↑ | 1.20 | 2.40 | 2.00× |" in lines
    assert "| pull | runs failed (after) | | | 1 of 2 |" in lines
    assert not any("runs failed (before)" in line for line in lines)


def test_table_when_one_side_never_ran() -> None:
    after = regress.Outcome(runs=[[regress.Figure("cold publish, s", 0.35)]])
    lines = regress.table({"publish": (regress.Outcome(failed=2), after)}).splitlines()
    assert "| publish | cold publish, s ↓ | – | 0.35 | – |" in lines
    assert "| publish | runs failed (before) | | | 2 of 2 |" in lines


def test_before_refs_defaults_and_overrides() -> None:
    names = [b.name for b in regress.BENCHES]
    refs = regress.before_refs(regress.BENCHES, "867cc33", [])
    assert refs["publish"] == "d489c6a"  # 867cc33's node plugin cannot pull
    assert {refs[n] for n in names if n != "publish"} == {"867cc33"}
    assert regress.before_refs(regress.BENCHES, "abc", ["publish="])["publish"] == "abc"
    refs = regress.before_refs(regress.BENCHES, "abc", ["controller=def"])
    assert refs["controller (burst)"] == refs["controller (paced 50/s)"] == "def"
    with pytest.raises(SystemExit):
        regress.before_refs(regress.BENCHES, "abc", ["publish"])


def test_ingest_writes_its_section_to_scratch_not_results_md(tmp_path: Path) -> None:
    ingest = next(b for b in regress.BENCHES if b.name == "ingest")
    for quick in (False, True):
        argv = regress.bench_argv(ingest, quick, str(tmp_path))
        assert argv[argv.index("--results") + 1] == str(tmp_path / "ingest-results.md")


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    os.makedirs(path)
    _git(path, "init", "--quiet")
    with open(os.path.join(path, "f.txt"), "w") as f:
        f.write("old\n")
    _git(path, "add", "f.txt")
    _git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "old")
    with open(os.path.join(path, "f.txt"), "w") as f:
        f.write("new, uncommitted\n")
    return path


def test_worktree_is_the_ref_and_is_removed_even_when_the_run_fails(repo: str) -> None:
    with pytest.raises(RuntimeError), regress.worktree(repo, "HEAD") as tree:
        with open(os.path.join(tree, "f.txt")) as f:
            assert f.read() == "old\n"  # the commit, not the main worktree's edit
        open(os.path.join(tree, "built-here"), "w").close()  # untracked output
        raise RuntimeError("a bench failed")
    assert not os.path.exists(tree)
    assert not os.path.exists(os.path.dirname(tree))
    assert len(_git(repo, "worktree", "list").splitlines()) == 1
    with open(os.path.join(repo, "f.txt")) as f:
        assert f.read() == "new, uncommitted\n"


def test_worktree_of_a_missing_ref_leaves_nothing(repo: str) -> None:
    with pytest.raises(subprocess.CalledProcessError), regress.worktree(repo, "nope"):
        pass
    assert len(_git(repo, "worktree", "list").splitlines()) == 1


def test_a_tree_that_would_import_another_trees_code_is_refused(tmp_path: Path) -> None:
    # its own bench, but cli and the rest would come from the editable install
    os.makedirs(tmp_path / "bench")
    (tmp_path / "bench" / "__init__.py").write_text("")
    with pytest.raises(SystemExit, match="not its own tree"):
        regress.check_imports(str(tmp_path))


def test_this_tree_imports_itself() -> None:
    regress.check_imports(regress.REPO)


# the try opens first: a SIGINT while the child is still starting (a loaded CI machine
# took 2 s to get this far) must find its finally already armed
CHILD = """
try:
    import subprocess, time
    helper = subprocess.Popen(["sleep", "60"])  # as a bench's registry or API server
    print(helper.pid, flush=True)
    time.sleep(60)
finally:
    print("cleaned up", flush=True)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_bench_past_its_timeout_is_interrupted_as_a_group(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out, rc = regress.run_group([sys.executable, "-c", CHILD], str(tmp_path), timeout=6)
    assert rc == -1 and "timed out after 6 s" in out
    assert "cleaned up" in out  # SIGINT, not SIGKILL: the bench's finally ran
    helper = int(out.split()[0])
    deadline = time.monotonic() + 5
    while not _gone(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(helper)  # its own children got the signal too
    assert time.monotonic() - t0 < 20
