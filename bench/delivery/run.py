"""bench/delivery: what workload delivery adds to the paths a pod goes through.

(a) Admission. A real etcd + kube-apiserver (cli/local/cluster.py, CRDs from
crds/), the modelcache webhook in its own process (``bench.delivery.hook``:
the manager's informers and ``webhook.Delivery``, TLS, a
MutatingWebhookConfiguration by URL). 200 Pod creates per case, each timed
around the API call by this process, in rounds that alternate the cases:

- ``no webhook``: no configuration registered (the cluster without us);
- ``webhook, bare Pod``: registered, the Pod asks for no model, so the API
  server's matchConditions (CEL) skip the call: what every other workload
  of the cluster pays;
- ``webhook, Pod with modelcache.io/models``: the API server calls the
  webhook over TLS and applies its JSON patch (volume, mounts, env, gate).

The handler's own time (``Admission.review``, timed inside the webhook
process) is reported beside them. Between rounds the configuration is
deleted and re-created by this process; each change is waited for with a
probe Pod (not timed).

(b) Warm NodePublish at 50 concurrent: the real node plugin twice on this
machine, one with the file resolver (``--models-file``), one with the
Kubernetes resolver (``--resolver kube``, the node ServiceAccount's rights
from daemonset/node-rbac.yaml, Model status read through its informer),
same registry, same model, both caches warm. Load from
``bench.publish.load`` (its own process, one grpc.aio loop), rounds
alternating between the two plugins, fresh targets each call. Needs root.

    python3 -m bench.delivery.run [--creates 200] [--rounds 10] [--skip-publish]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from api import names as c
from bench import common
from bench.publish.run import pct
from cli.local import cluster as localcluster
from cli.local import registry as localregistry
from controller.delivery import webhookconfig
from kube import client as k
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as fx
from tests.integration.test_crds import install_crds
from tests.integration.test_csi_kube import KubePlugin
from tests.integration.test_delivery_webhook import NAMESPACES, SYSTEM_NS, body, new_digest

GROUP = "modelcache.io/v1alpha1"


def namespace(client: k.Kube, name: str) -> None:
    """A namespace and its default ServiceAccount (no controller-manager makes it here,
    and Pod admission wants it)."""
    for res, obj, ns in (
            (NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
             None),
            (k.Resource("", "v1", "serviceaccounts"),
             {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}},
             name)):
        try:
            client.create(res, obj, ns)
        except k.Conflict:
            pass


def ready_model(client: k.Kube, ns: str, name: str, reference: str | None = None,
                digest: str | None = None) -> None:
    """A Model whose status is Ready, as the controller writes it after a publish."""
    client.create(k.MODELS, {"apiVersion": GROUP, "kind": "Model", "metadata": {"name": name},
                             "spec": {"source": {"huggingFace": {"repo": f"org/{name}"}}}}, ns)
    artifact: dict[str, Any] = {"digest": digest or new_digest(), "sizeBytes": 1}
    if reference:
        artifact["reference"] = reference
    client.patch(k.MODELS, name, {"status": {
        "phase": "Ready", "artifact": artifact,
        "resolved": {"family": "qwen2", "format": "Safetensors"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Published",
                        "message": "ready", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}},
        ns, sub="status")


def wait_until(fn: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


# -- (a) admission -----------------------------------------------------------------------


def admission(kube: localcluster.LocalCluster, creates: int,
              rounds: int) -> list[tuple[str, str]]:
    client = k.Kube.from_config(kube.kubeconfig)
    namespace(client, SYSTEM_NS)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    namespace(client, ns)
    ready_model(client, ns, "qwen")
    hook = subprocess.Popen([sys.executable, "-m", "bench.delivery.hook", "--kubeconfig",
                             kube.kubeconfig], cwd=localcluster.REPO_ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert hook.stdin is not None and hook.stdout is not None
    try:
        config = json.loads(hook.stdout.readline())["config"]
        registered = client.get(webhookconfig.MWC, config)
        saved = {"apiVersion": registered["apiVersion"], "kind": registered["kind"],
                 "metadata": {"name": config}, "webhooks": registered["webhooks"]}
        n = 0

        def create(annotated: bool) -> tuple[float, dict[str, Any]]:
            nonlocal n
            n += 1
            obj = body("Pod", f"p{n}", {c.ANN_MODELS: "qwen"} if annotated else {})
            t0 = time.perf_counter()
            stored = client.create(k.PODS, obj, ns)
            return time.perf_counter() - t0, stored

        def injected(stored: dict[str, Any]) -> bool:
            return c.ANN_INJECTED in (stored["metadata"].get("annotations") or {})

        state = [True]  # the hook process registered it

        def hooked(on: bool) -> None:
            """Register or remove the configuration; wait until the API server acts on it."""
            if state[0] == on:
                return
            state[0] = on
            if on:
                client.create(webhookconfig.MWC, saved)
            else:
                client.delete(webhookconfig.MWC, config)
            wait_until(lambda: injected(create(True)[1]) == on,
                       f"the webhook configuration {'on' if on else 'off'}")

        def handler() -> list[float]:
            assert hook.stdin is not None and hook.stdout is not None
            hook.stdin.write("dump\n")
            hook.stdin.flush()
            return list(json.loads(hook.stdout.readline())["handler"])

        # both phases create the same mix (bare and annotated Pods, interleaved), so
        # each case compares like with like: only the registration differs
        cases: dict[tuple[bool, bool], list[float]] = {
            (hook_on, ann): [] for hook_on in (False, True) for ann in (False, True)}
        handled: list[float] = []
        per_round = max(1, creates // rounds)
        for r in range(rounds):
            for hook_on in ((False, True) if r % 2 == 0 else (True, False)):
                hooked(hook_on)
                handler()  # the probes' reviews are not counted
                for i in range(2 * per_round):
                    annotated = (i + r) % 2 == 0
                    dt, stored = create(annotated)
                    assert injected(stored) == (annotated and hook_on), stored["metadata"]
                    cases[(hook_on, annotated)].append(dt)
                handled += handler()
        hooked(True)  # the hook process removes its configuration when it stops
    finally:
        hook.stdin.close()
        hook.wait(30)
        client.close()

    def ms(xs: list[float], digits: int = 1) -> str:
        return (f"{pct(xs, 50) * 1e3:.{digits}f} / {pct(xs, 99) * 1e3:.{digits}f} ms "
                f"({len(xs)})")

    def delta(ann: bool) -> str:
        on, off = cases[(True, ann)], cases[(False, ann)]
        return (f"{(pct(on, 50) - pct(off, 50)) * 1e3:+.1f} / "
                f"{(pct(on, 99) - pct(off, 99)) * 1e3:+.1f} ms; mean "
                f"{(statistics.mean(on) - statistics.mean(off)) * 1e3:+.1f} ms")

    return [
        ("Pod create, bare Pod: no webhook registered", ms(cases[(False, False)])),
        ("Pod create, bare Pod: webhook registered (matchConditions skip the call)",
         ms(cases[(True, False)])),
        ("  → what the webhook adds to every other Pod (p50 / p99; mean)", delta(False)),
        ("Pod create, Pod with modelcache.io/models: no webhook registered",
         ms(cases[(False, True)])),
        ("Pod create, Pod with modelcache.io/models: webhook called, patch applied",
         ms(cases[(True, True)])),
        ("  → what injection adds to a Pod that asks for a model (p50 / p99; mean)", delta(True)),
        ("webhook handler (Admission.review, timed in the webhook process)", ms(handled)),
    ]


# -- (b) warm publish, file vs kube resolver --------------------------------------------------


def publish(kube: localcluster.LocalCluster, rounds: int, size: int) -> list[tuple[str, str]]:
    if os.geteuid() != 0:
        raise SystemExit("the publish part needs root (bind mounts); or --skip-publish")
    work = tempfile.mkdtemp(prefix="modelcache-bench-delivery-", dir="/var/tmp")
    src = common.model_dir(size, 10, seed=31)
    reg = localregistry.start(os.path.join(work, "registry"))
    plugins: dict[str, fx.PluginProcess] = {}
    try:
        client = k.Kube.from_config(kube.kubeconfig)
        ns = "bench"
        namespace(client, ns)
        ref = parse(f"{reg.host}/models/{ns}/m:v1")
        pack = pack_to_registry(src, RegistryClient(reg.host, insecure=True), ref).pack
        ready_model(client, ns, "m", str(ref), pack.digest)
        client.close()
        models = os.path.join(work, "models.json")
        fx.write_models_file(models, {f"{ns}/m": str(ref)})
        kube.kubectl("apply", "-f", os.path.join(localcluster.REPO_ROOT, "daemonset",
                                                 "controller-namespace.yaml"))
        kube.kubectl("apply", "-f", os.path.join(localcluster.REPO_ROOT, "daemonset",
                                                 "node-rbac.yaml"))
        node_kc = kube.serviceaccount_kubeconfig("modelcache-node", "modelcache-system")
        for name in ("file", "kube"):
            os.makedirs(os.path.join(work, name))
        plugins["file"] = fx.PluginProcess(os.path.join(work, "file"),
                                           os.path.join(work, "file", "cache"), models,
                                           [reg.host]).start()
        plugins["kube"] = KubePlugin(os.path.join(work, "kube"), node_kc, [reg.host],
                                     ["--no-prefetch", "--no-node-labels"], "bench-node").start()
        pods = os.path.join(work, "pods")
        os.makedirs(pods)
        for name, p in plugins.items():  # cold publish once: both caches warm after
            t = os.path.join(pods, f"warm-{name}")
            os.makedirs(t)
            p.node().NodePublishVolume(fx.publish_request(t, t + "/mount", model="m",
                                                          namespace=ns), timeout=300)
            p.node().NodeUnpublishVolume(fx.unpublish_request(t, t + "/mount"), timeout=60)

        def load(p: fx.PluginProcess, floor: bool = False) -> dict[str, Any]:
            assert p.proc is not None
            argv = [sys.executable, "-m", "bench.publish.load", "--socket", p.socket,
                    "--pods-dir", pods, "--model", "m", "--namespace", ns,
                    "--concurrency", "50", "--rounds", "1", "--server-pid", str(p.proc.pid),
                    *(["--floor"] if floor else [])]
            out = subprocess.run(argv, check=True, capture_output=True, text=True,
                                 cwd=localcluster.REPO_ROOT).stdout
            return dict(json.loads(out))

        lat: dict[str, list[float]] = {"file": [], "kube": []}
        cpu = {"file": 0.0, "kube": 0.0}
        round_p99: dict[str, list[float]] = {"file": [], "kube": []}
        floor: dict[str, list[float]] = {"file": [], "kube": []}
        for r in range(rounds):
            order = ["file", "kube"] if r % 2 == 0 else ["kube", "file"]
            for name in order:
                d = load(plugins[name])
                lat[name] += d["latencies"]
                cpu[name] += d["server_cpu"]
                round_p99[name].append(pct(d["latencies"], 99))
        for name, xs in round_p99.items():  # which rounds were slow: a pattern or noise
            print(f"per-round p99, {name}: " + " ".join(f"{x * 1e3:.0f}" for x in xs),
                  file=sys.stderr)
        for _ in range(max(1, rounds // 2)):
            for name in ("file", "kube"):
                floor[name] += load(plugins[name], floor=True)["latencies"]
    finally:
        for p in plugins.values():
            p.stop()
        fx.unmount_everything_under(work)
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, label in (("file", "file resolver (--models-file)"),
                        ("kube", "Kubernetes resolver (informer)")):
        xs = lat[name]
        rows.append((f"warm publish p50 / p99 at 50 concurrent, {label}",
                     f"{pct(xs, 50) * 1e3:.1f} / {pct(xs, 99) * 1e3:.1f} ms ({len(xs)} calls; "
                     f"per-round p99 {min(round_p99[name]) * 1e3:.0f}–"
                     f"{max(round_p99[name]) * 1e3:.0f} ms, median "
                     f"{pct(round_p99[name], 50) * 1e3:.0f} ms; plugin CPU "
                     f"{cpu[name] / len(xs) * 1e3:.2f} ms/call; NodeGetInfo p50 / p99 "
                     f"{pct(floor[name], 50) * 1e3:.1f} / {pct(floor[name], 99) * 1e3:.1f} ms)"))
    kube_p = pct(lat["kube"], 99) / pct(lat["file"], 99)
    kube_r = pct(round_p99["kube"], 50) / pct(round_p99["file"], 50)
    rows.append(("kube / file: p99; median per-round p99 (steadier under load)",
                 f"{kube_p:.2f}×; {kube_r:.2f}×"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--creates", type=int, default=200, help="Pod creates per case")
    ap.add_argument("--rounds", type=int, default=10,
                    help="rounds (admission: the creates are spread over them; publish: "
                    "rounds of 50 concurrent per resolver)")
    ap.add_argument("--size-mib", type=int, default=64, help="model size for the publish part")
    ap.add_argument("--skip-publish", action="store_true")
    ap.add_argument("--skip-admission", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows: list[tuple[str, str]] = []
    with localcluster.running() as kube:
        install_crds(kube)
        if not args.skip_admission:
            rows += admission(kube, args.creates, args.rounds)
        if not args.skip_publish:
            rows += publish(kube, args.rounds, args.size_mib << 20)
    rows.append(("load average (1 min) at start / end, 2 cores",
                 f"{load0:.2f} / {os.getloadavg()[0]:.2f}"))
    print(f"\n`{' '.join(['python3', '-m', 'bench.delivery.run', *sys.argv[1:]])}`\n")
    print("| measure (p50 / p99) | value |")
    print("|---|---|")
    for key, v in rows:
        print(f"| {key} | {v} |")


if __name__ == "__main__":
    main()
