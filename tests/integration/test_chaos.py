"""Chaos: the node plugin, the manager and publish workers SIGKILLed while models that
share layers are published and mounted; afterwards nothing wrong is visible.

Everything is the real program on loopback: etcd + kube-apiserver (a cluster
of its own: the manager takes on every Model of a cluster, and this test
kills it), the DMCR (the suite's docker-registry), the manager
(``modelcache-controller manager --embedded-jobs``: its publish Jobs run as
local processes, controller/embedded/jobrunner.py, with a work PVC so a retry
can resume), and the node plugin (``modelcache-node --resolver kube`` with the
node ServiceAccount of daemonset/node-rbac.yaml, its cache on a loop XFS),
called over its unix socket as kubelet calls it (tests/chaosrig.py). The
source is the local Hugging Face Hub at a bounded rate; the node pulls through
a rate-bounded proxy, so kills land inside transfers.

Four Models share layers: the same config.json and tokenizer.json, one weight
shard (under two different paths), plus a shard of their own. A seeded
schedule (``MODELCACHE_CHAOS_SEED``, else random; printed first) applies the
Models, starts pods (several per model; a pod's volume is published once its
Model was seen Ready, as the scheduling gate makes it, pinned to the digest
when the Model was Ready at admission, as the webhook pins it) and SIGKILLs
4-8 times the node plugin, the manager (both started again at once) or a
publish worker (the Job's retry starts another; at most two per model, within
the default backoffLimit). The seed replays the schedule, not the exact
interleaving with the processes.

Afterwards, with bounded waits: every Model is Ready; every target is one
read-only bind mount showing exactly the files of its model's manifest (read
from the registry by digest), each hashing to its layer digest; no answer
kubelet takes as final was given; no ``.part``/``.lock``/temp file or hidden
temp tree is left in the node cache, no publish worker is left running, no
work claim directory or emptyDir is left by the Job runner; unpublishing
everything leaves no mount and no tainted tree. Needs root (mounts, loop XFS).
The rig (programs, hub, kubelet's calls, bringing the system up) is
tests/chaosrig.py; this file is the one scenario and its checks, top to bottom,
a little over 400 lines for that reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from api import names as contract
from csi import mounts
from csi.stubs import pb
from kube import client as k
from modelpack.oci import manifest as mf
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from tests import chaosrig, modelgen

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SEED_ENV = "MODELCACHE_CHAOS_SEED"
SYSTEM_NS = "modelcache-system"  # the node ServiceAccount's namespace (node-rbac.yaml)
NODE = "chaos-node"
MODELS = ("m0", "m1", "m2", "m3")
SHARED = 3 << 20  # the shard every model has
OWN = 3 << 19  # each model's own shard
HUB_RATE = 1 << 19  # bytes/s per source response: a publish lasts seconds
PULL_RATE = 1 << 20  # bytes/s per registry response the node pulls through
CHAOS_WINDOW = 18.0  # kills are scheduled within this many seconds of the start
RECOVERY = 60.0  # the longest the system may take to converge afterwards
WORKER_KILLS_PER_MODEL = 2  # the publish Job's backoffLimit is 3


def _say(text: str) -> None:
    print(f"chaos: {text}", flush=True)


def wait_until(what: str, check: Callable[[], Any], timeout: float, seed: int,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"[seed {seed}] {what}: not within {timeout:.0f} s; last: {last!r}")


# -- the models ---------------------------------------------------------------------


def model_files(tmp: str) -> dict[str, dict[str, bytes]]:
    """name -> {path: bytes}: shared config, tokenizer and shard, plus a shard of its own."""
    def shard(seed: int, size: int) -> bytes:
        path = os.path.join(tmp, f"shard-{seed}.safetensors")
        modelgen.write_big_safetensors(path, size, seed=seed)
        with open(path, "rb") as f:
            return f.read()

    config = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                         "torch_dtype": "float16"}).encode()
    tokenizer = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}
                           ).encode()
    shared = shard(1, SHARED)
    out = {}
    for i, name in enumerate(MODELS):
        files = {"config.json": config, "tokenizer.json": tokenizer}
        if name == "m3":  # the shared shard under another path, in a subdirectory
            files["weights/base.safetensors"] = shared
            files["weights/adapter.safetensors"] = shard(100 + i, OWN)
        else:
            files["model-00001-of-00002.safetensors"] = shared
            files["model-00002-of-00002.safetensors"] = shard(100 + i, OWN)
        out[name] = files
    return out


def model_body(name: str, ns: str, prefetch: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"huggingFace": {"repo": f"chaos/{name}"}}}
    if prefetch:  # the node pulls it once Ready, whether a pod asks or not
        spec["delivery"] = {"nodeCache": {"prefetch": {"nodeSelector": {
            "kubernetes.io/hostname": NODE}}}}
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def status_of(client: k.Kube, ns: str, name: str) -> dict[str, Any]:
    try:
        return dict(client.get(k.MODELS, name, ns).get("status") or {})
    except k.NotFound:
        return {}


# -- the pods, as kubelet sees them -----------------------------------------------------


@dataclass
class Pod:
    model: str
    name: str
    uid: str
    admit_at: float  # seconds after the start, when the API server admits it
    pinned: str = ""  # the digest the webhook pinned, if the Model was Ready at admission
    target: str = ""
    volume_id: str = ""
    done: bool = False
    error: str = ""

    def request(self, ns: str, pods_root: str) -> Any:
        parent = os.path.join(pods_root, self.uid, "volumes", "kubernetes.io~csi", "model")
        os.makedirs(parent, exist_ok=True)  # kubelet makes only the parent
        self.target = os.path.join(parent, "mount")
        self.volume_id = "csi-" + hashlib.sha256(f"{self.uid}/model".encode()).hexdigest()[:40]
        attrs = {contract.ATTR_MODEL: self.model}
        if self.pinned:
            attrs[contract.ATTR_DIGEST] = self.pinned
        ctx = {**attrs, "csi.storage.k8s.io/pod.name": self.name,
               "csi.storage.k8s.io/pod.namespace": ns, "csi.storage.k8s.io/pod.uid": self.uid,
               "csi.storage.k8s.io/serviceAccount.name": "default",
               "csi.storage.k8s.io/ephemeral": "true"}
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY))
        cap.mount.SetInParent()
        return pb.NodePublishVolumeRequest(volume_id=self.volume_id, target_path=self.target,
                                           volume_capability=cap, readonly=True,
                                           volume_context=ctx)


# -- the schedule -----------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    applies: tuple[tuple[float, str, bool], ...]  # (seconds, model, prefetched)
    kills: tuple[tuple[float, str], ...]  # (seconds, "node" | "manager" | "worker")
    pods: tuple[tuple[float, str, str], ...]  # (admitted at, model, pod uid)


def schedule(rng: random.Random) -> Schedule:
    applies = tuple(sorted((rng.uniform(0.0, 3.0), m, rng.random() < 0.5) for m in MODELS))
    kinds = ["node", "manager", "worker"]
    rng.shuffle(kinds)  # each kind at least once
    kinds += [rng.choice(("node", "manager", "worker")) for _ in range(rng.randint(1, 5))]
    # a worker lives while its model publishes: its kills fall early; the node's pulls
    # start once models are Ready
    kills = tuple(sorted((rng.uniform(1.5, 9.0) if kind == "worker" else
                          rng.uniform(4.0, CHAOS_WINDOW) if kind == "node" else
                          rng.uniform(1.0, CHAOS_WINDOW), kind) for kind in kinds))
    # pods come one by one, and once in a burst, one for every model (a rollout): the
    # node then pulls several models that share layers at once
    burst = rng.uniform(6.0, 12.0)
    pods = tuple(sorted([(rng.uniform(0.5, 12.0), m, str(uuid.UUID(int=rng.getrandbits(128))))
                         for m in MODELS for _ in range(rng.randint(1, 2))]
                        + [(burst, m, str(uuid.UUID(int=rng.getrandbits(128))))
                           for m in MODELS]))
    return Schedule(applies, kills, pods)


def kill(s: chaosrig.System, kind: str, rng: random.Random, worker_kills: dict[str, int]) -> str:
    """SIGKILL one part now; the plugin and the manager are started again at once.

    The plugin is killed while a CSI call is in flight, if one comes within 4 s.
    """
    if kind in ("node", "manager"):
        prog = s.node if kind == "node" else s.manager
        if kind == "node":
            until = time.monotonic() + 4.0
            while not s.kubelet.in_flight and time.monotonic() < until:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
        pid = prog.pid
        prog.kill()
        prog.start()
        return f"{prog.name} pid {pid} killed, restarted as pid {prog.pid}"
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        live = {pid: m for pid, m in chaosrig.publish_workers(s.jobs_root).items()
                if worker_kills.get(m, 0) < WORKER_KILLS_PER_MODEL}
        if live:
            pid = rng.choice(sorted(live))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                worker_kills[live[pid]] = worker_kills.get(live[pid], 0) + 1
                return f"publish worker of {live[pid]} pid {pid} killed"
        time.sleep(0.1)
    return "no publish worker alive to kill: skipped"


def run_pod(s: chaosrig.System, pod: Pod, admitted_at: float) -> None:
    """One pod: admitted (pinned if its Model is Ready), ungated once Ready, then its volume."""
    try:
        time.sleep(max(0.0, admitted_at - time.monotonic()))
        st = status_of(s.client, s.ns, pod.model)
        if st.get("phase") == "Ready":
            pod.pinned = st["artifact"]["digest"]
        else:  # the scheduling gate holds it until the Model is Ready
            while status_of(s.client, s.ns, pod.model).get("phase") != "Ready":
                if time.monotonic() > s.kubelet.give_up_at:
                    raise AssertionError(f"Model {pod.model} never Ready for pod {pod.name}")
                time.sleep(0.2)
        s.kubelet.publish(pod.request(s.ns, s.pods_root))
        pod.done = True
    except Exception as e:  # reported by the test, with the seed
        pod.error = f"{type(e).__name__}: {e}"


# -- the checks -------------------------------------------------------------------------


def manifest_files(s: chaosrig.System, ref: str, digest: str) -> dict[str, str]:
    """path -> layer digest of the manifest ``digest``, read from the registry."""
    r = reference.parse(ref)
    raw, _, _ = RegistryClient(s.registry.host, insecure=True).get_manifest(
        reference.Reference(r.host, r.repository, digest=digest))
    return {layer.path: layer.digest for layer in mf.layers_of(mf.parse_manifest(raw, digest)[0])}


def target_problems(s: chaosrig.System, pod: Pod, digest: str, ref: str) -> list[str]:
    """What is wrong with what ``pod``'s target shows (nothing: [])."""
    where = f"pod {pod.name} ({pod.model}) {pod.target}"
    layers = mounts.mounts_at(pod.target)
    if len(layers) != 1:
        return [f"{where}: {len(layers)} mounts at the target, not 1"]
    m = layers[0]
    out = [] if m.read_only else [f"{where}: mounted read-write ({sorted(m.options)})"]
    shown = "sha256:" + os.path.basename(m.root).split("-")[0]
    if shown != digest:
        out.append(f"{where}: shows tree {m.root}, the Model's digest is {digest}")
    want = manifest_files(s, ref, shown)
    seen: dict[str, str] = {}
    for dirpath, _, files in os.walk(pod.target):
        for f in files:
            full = os.path.join(dirpath, f)
            h = hashlib.sha256()
            with open(full, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            seen[os.path.relpath(full, pod.target)] = "sha256:" + h.hexdigest()
    if set(seen) != set(want):
        out.append(f"{where}: files {sorted(seen)} != manifest {sorted(want)}")
    out += [f"{where}: {p} hashes to {seen[p]}, its layer is {want[p]}"
            for p in sorted(set(seen) & set(want)) if seen[p] != want[p]]
    return out


def cache_leftovers(s: chaosrig.System) -> list[str]:
    """Temp files and trees in the node cache; a held ``.part``/``.lock`` says who holds it."""
    temps = []
    for dirpath, dirs, files in os.walk(s.cache):
        rel = os.path.relpath(dirpath, s.cache)
        if rel == "models":
            temps += [os.path.join(dirpath, d) for d in dirs if d.startswith(".")]
        temps += [os.path.join(dirpath, f) for f in files
                  if f.endswith((".part", ".lock")) or ".tmp" in f]
    held = chaosrig.holders(temps)
    return [f"{p}" + (f" (held by pids {held[p]})" if held[p] else " (no live writer)")
            for p in temps]


def jobs_and_pods(s: chaosrig.System) -> str:
    """The publish Jobs and their pods as the API server shows them (for failures)."""
    jobs, _ = s.client.list(k.JOBS, SYSTEM_NS)
    pods, _ = s.client.list(k.PODS, SYSTEM_NS)
    lines = []
    for job in jobs:
        st = job.get("status") or {}
        lines.append(f"Job {job['metadata']['name']}: active {st.get('active')} failed "
                     f"{st.get('failed')} succeeded {st.get('succeeded')}; pods " + ", ".join(
                         f"{p['metadata']['name']}={(p.get('status') or {}).get('phase')}"
                         for p in pods if (p['metadata'].get('labels') or {}).get('job-name')
                         == job['metadata']['name']))
    return "\n".join(lines)


def jobs_leftovers(s: chaosrig.System) -> list[str]:
    """What the Job runner and the workers left: emptyDirs of attempts, work claims' dirs."""
    out = []
    if not os.path.isdir(s.jobs_root):
        return out
    for name in os.listdir(s.jobs_root):
        if os.path.isdir(os.path.join(s.jobs_root, name, "volumes")):
            out.append(os.path.join(s.jobs_root, name, "volumes"))
    pvcs = os.path.join(s.jobs_root, "pvcs")
    for dirpath, dirs, _ in os.walk(pvcs):
        if os.path.dirname(dirpath) == pvcs:  # pvcs/<namespace>/<claim>
            out += [os.path.join(dirpath, d) for d in dirs]
    return out


# -- the test ---------------------------------------------------------------------------


def test_chaos_kills_converge_to_verified_mounts(registry: Any, tmp_path: Any) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 32))
    _say(f"seed {seed} (replay with {SEED_ENV}={seed})")
    print(f"\nchaos seed {seed}", file=sys.stderr, flush=True)
    rng = random.Random(seed)
    plan = schedule(rng)
    _say(f"schedule: applies {[(round(t, 1), m) for t, m, _ in plan.applies]}; kills "
         f"{[(round(t, 1), kd) for t, kd in plan.kills]}; {len(plan.pods)} pods")
    t_start = time.monotonic()
    sources = model_files(str(tmp_path))
    work = str(tmp_path / "sys")
    with chaosrig.system(work, registry, sources, node_id=NODE, system_ns=SYSTEM_NS,
                         hub_rate=HUB_RATE, pull_rate=PULL_RATE) as s:
        try:
            _chaos_then_check(s, seed, plan, rng)
        except BaseException:
            _say(f"manager log:\n{s.manager.tail(30)}")
            _say(f"node plugin log:\n{s.node.tail(30)}")
            raise
    _say(f"seed {seed}: passed in {time.monotonic() - t_start:.1f} s")


def _chaos_then_check(s: chaosrig.System, seed: int, plan: Schedule, rng: random.Random) -> None:
    t0 = time.monotonic()
    pods = [Pod(m, f"{m}-{uid[:6]}", uid, at) for at, m, uid in plan.pods]
    threads = [threading.Thread(target=run_pod, args=(s, p, t0 + p.admit_at),
                                daemon=True, name=p.name) for p in pods]
    for t in threads:
        t.start()
    prefetched = {m for _, m, pf in plan.applies if pf}
    events = sorted([(at, "apply", m) for at, m, _ in plan.applies]
                    + [(at, "kill", kd) for at, kd in plan.kills])
    worker_kills: dict[str, int] = {}
    for at, what, arg in events:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        if what == "apply":
            s.client.create(k.MODELS, model_body(arg, s.ns, arg in prefetched), s.ns)
            _say(f"{time.monotonic() - t0:5.1f} s  applied Model {arg}"
                 + (" (prefetched)" if arg in prefetched else ""))
        else:
            phases = " ".join(f"{m}={status_of(s.client, s.ns, m).get('phase', '-')}"
                              for m in MODELS)
            _say(f"{time.monotonic() - t0:5.1f} s  ({phases}) {kill(s, arg, rng, worker_kills)}")
    _say(f"{time.monotonic() - t0:5.1f} s  chaos over; recovering")
    deadline = s.kubelet.give_up_at = time.monotonic() + RECOVERY

    # every Model Ready, every pod's volume published
    def all_ready() -> bool:
        return all(status_of(s.client, s.ns, m).get("phase") == "Ready" for m in MODELS)
    try:
        wait_until("every Model Ready", all_ready, deadline - time.monotonic(), seed)
    except AssertionError:
        raise AssertionError(f"[seed {seed}] not every Model Ready: " + "; ".join(
            f"{m}: {status_of(s.client, s.ns, m).get('phase')} "
            f"{[c.get('message') for c in status_of(s.client, s.ns, m).get('conditions') or []]}"
            for m in MODELS) + "\n" + jobs_and_pods(s)) from None
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [f"{p.name}: {p.error or 'not published'}" for p in pods if not p.done]
    assert not stuck, f"[seed {seed}] pods whose volume never published: {stuck}"
    _say(f"{time.monotonic() - t0:5.1f} s  every Model Ready, {len(pods)} volumes published")

    # every visible file hashes to its layer digest
    models = {m: status_of(s.client, s.ns, m)["artifact"] for m in MODELS}
    problems = [p for pod in pods for p in target_problems(
        s, pod, models[pod.model]["digest"], models[pod.model]["reference"])]
    assert not problems, f"[seed {seed}] wrong content under published targets:\n" + \
        "\n".join(problems)
    final = s.kubelet.final_errors()
    assert not final, f"[seed {seed}] answers kubelet takes as final: {final}"

    # nothing temporary outlives recovery
    wait_until("no publish worker left running",
               lambda: not chaosrig.publish_workers(s.jobs_root), 30, seed)
    leftovers: list[str] = []

    def clean() -> bool:
        leftovers[:] = cache_leftovers(s) + jobs_leftovers(s)
        return not leftovers
    with contextlib.suppress(AssertionError):
        wait_until("no temp files", clean, 15, seed)
    assert not leftovers, f"[seed {seed}] temp files outlived recovery:\n" + "\n".join(
        leftovers) + "\n" + jobs_and_pods(s)

    # unpublish everything: no mount left, no tainted tree kept
    for pod in pods:
        s.kubelet.give_up_at = time.monotonic() + 30
        s.kubelet.unpublish(pod.volume_id, pod.target)
    real = os.path.realpath(s.pods_root) + "/"
    left = [m.mount_point for m in mounts.read_mounts() if m.mount_point.startswith(real)]
    assert not left, f"[seed {seed}] mounts left after unpublish: {left}"
    assert not [p.target for p in pods if os.path.exists(p.target)], \
        f"[seed {seed}] targets left after unpublish"
    tainted = os.path.join(s.cache, "tainted")
    wait_until("no tainted tree once unmounted",
               lambda: not os.path.isdir(tainted) or not os.listdir(tainted), 15, seed)
    _say(f"{time.monotonic() - t0:5.1f} s  checked: {len(pods)} targets; worker kills "
         f"{worker_kills or 'none'}; kubelet saw {s.kubelet.codes() or 'only OK'}")
    for answer in sorted({a for _, _, a in s.kubelet.answers})[:12]:
        _say(f"  answer: {answer[:200]}")
