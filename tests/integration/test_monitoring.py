"""Monitoring as shipped: the chart's alert rules and Grafana dashboard against a real
Prometheus (Debian's package, hack/install.d/prometheus.sh) that scrapes a real manager
and a real node plugin, each a process.

The cheapest traffic that touches every panel: one Model published by the manager
(``--embedded-jobs``: its publish Job runs as a local process), one annotated Pod through
the manager's admission webhook (registered with the real API server) and its scheduling
gate, and one NodePublishVolume of that model on the node plugin (real bind mounts: root).
Prometheus scrapes both every second; then every dashboard target's query returns at
least one series and every rule of files/alerts.yaml is loaded with health ok.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any

import pytest
import yaml

from api import names as c
from kube import client as k
from tests import csi_fixtures as cf_
from tests import kubeenv
from tests.integration.test_chart import helm, render  # noqa: F401  (fixture)
from tests.integration.test_controller import (
    SYSTEM_NS,
    ManagerProcess,
    ensure_namespace,
    hf_model,
    install_crds,
    phase_is,
    wait_for,
)
from tests.integration.test_delivery_webhook import body

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube

CHART_FILES = os.path.join(kubeenv.REPO_ROOT, "charts", "modelcache", "files")
RULES = os.path.join(CHART_FILES, "alerts.yaml")
DASHBOARD = os.path.join(CHART_FILES, "dashboard.json")
MWC = k.Resource("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", False)


def dashboard_targets() -> list[tuple[str, str]]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


# -- the chart ships them -----------------------------------------------------------


def test_chart_ships_rules_and_dashboard(helm: str) -> None:  # noqa: F811
    objs = render(helm, "mon", "monitoring.rules.enabled=true",
                  "monitoring.prometheusRule.enabled=true",
                  "monitoring.prometheusRule.labels.release=kps",
                  "monitoring.podMonitor.enabled=true", "monitoring.dashboard.enabled=true")
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    with open(RULES) as f:
        rules_text = f.read()
    assert by[("ConfigMap", "modelcache-alert-rules")]["data"]["modelcache.rules.yaml"] \
        == rules_text
    rule = by[("PrometheusRule", "modelcache")]
    assert rule["spec"]["groups"] == yaml.safe_load(rules_text)["groups"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    dash = by[("ConfigMap", "modelcache-dashboard")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    with open(DASHBOARD) as f:
        assert json.loads(dash["data"]["modelcache.json"]) == json.load(f)
    # the job labels the "down" rules read: <namespace>/modelcache-{controller,node}
    ctl, node = by[("PodMonitor", "modelcache-controller")], by[("PodMonitor", "modelcache-node")]
    assert ctl["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert node["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert node["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "node"
    # only the rules ConfigMap without the operator; nothing by default
    plain = render(helm, "mon", "monitoring.rules.enabled=true")
    assert {o["kind"] for o in plain if o["metadata"]["name"].startswith("modelcache-alert")} \
        == {"ConfigMap"}
    assert not any(o["kind"] in ("PrometheusRule", "PodMonitor") for o in plain)
    assert not any("monitoring" in str(o.get("kind")) or o["metadata"]["name"] in (
        "modelcache-alert-rules", "modelcache-dashboard") for o in render(helm, "mon"))


# -- a real Prometheus scraping a real manager and node plugin ---------------------


class Prometheus:
    """``prometheus`` as a process on a free loopback port, scraping every second."""

    def __init__(self, work: str, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not installed (hack/install.d/prometheus.sh)")
        self.port = kubeenv.free_port()
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "rule_files": [RULES],
               "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [t]}]}
                                  for job, t in targets.items()]}
        path = os.path.join(work, "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        self.log_path = os.path.join(work, "prometheus.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={path}", f"--storage.tsdb.path={work}/tsdb",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        wait_for(self._ready, 30, what="prometheus /-/ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def logs(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)



@pytest.mark.root
@pytest.mark.timeout(180)
def test_prometheus_scrapes_manager_and_node_every_panel_has_data(
        kube: kubeenv.KubeEnv, registry: Any, hub_server: Any, small_model: str,
        tmp_path: Any) -> None:
    t0 = time.monotonic()
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    ensure_namespace(client, SYSTEM_NS)
    ns = f"mon-{uuid.uuid4().hex[:6]}"
    ensure_namespace(client, ns)
    client.create(k.Resource("", "v1", "serviceaccounts"), {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, ns)
    webhook_port, mwc = kubeenv.free_port(), f"modelcache-mon-{uuid.uuid4().hex[:6]}"
    manager = ManagerProcess(kube, registry.host, hub_server.url, str(tmp_path / "mgr.log"),
                             extra=["--embedded-jobs", str(tmp_path / "jobs"),
                                    "--webhook-url", f"https://127.0.0.1:{webhook_port}",
                                    "--webhook-listen", f"127.0.0.1:{webhook_port}",
                                    "--webhook-config-name", mwc])
    node_work = tmp_path / "node"
    node_work.mkdir()
    models_file = str(node_work / "models.json")
    cf_.write_models_file(models_file, {})
    metrics_port = kubeenv.free_port()
    plugin = cf_.PluginProcess(str(node_work), str(node_work / "cache"), models_file,
                               [registry.host], ["--metrics-address", f"127.0.0.1:{metrics_port}",
                                                 "--cache-capacity", "1Gi"])
    prom: Prometheus | None = None
    targets = tmp_path / "pods"
    try:
        manager.start()
        plugin.start()
        prom = Prometheus(str(tmp_path), {"modelcache-controller": f"127.0.0.1:{manager.port}",
                                          "modelcache-node": f"127.0.0.1:{metrics_port}"})
        # a Model, and a Pod that mounts it: mutated by the webhook, held by the gate
        hub_server.add_repo(f"acme/{ns}", small_model)
        client.create(k.MODELS, hf_model("m", ns, f"acme/{ns}"), ns)
        wait_for(lambda: client.get(MWC, mwc), 30, what="the webhook registered")
        pod = client.create(k.PODS, body("Pod", "p", {c.ANN_MODELS: "m"}), ns)
        assert pod["spec"].get("schedulingGates") == [{"name": c.GATE}], pod["spec"]
        m = wait_for(phase_is(client, ns, "m", "Ready", "Failed"), 90, what="Model Ready")
        assert m["status"]["phase"] == "Ready", (m["status"], manager.logs())
        # the node plugin mounts it
        digest = m["status"]["artifact"]["digest"]
        cf_.write_models_file(models_file,
                              {f"{ns}/m": f"{registry.host}/models/{ns}/m@{digest}"})
        target = os.path.join(str(targets), "pod1", "mount")
        os.makedirs(os.path.dirname(target))
        plugin.node().NodePublishVolume(
            cf_.publish_request("vol-1", target, model="m", namespace=ns), timeout=60)
        traffic_s = time.monotonic() - t0

        # a few scrapes after the traffic
        scraped = time.monotonic()
        wait_for(lambda: prom.query(  # type: ignore[union-attr]
            'sum(modelcache_node_pull_bytes_total) > 0 and sum(modelcache_webhook_admissions_'
            'total) > 0'), 30, interval=0.5, what="the traffic scraped")
        time.sleep(3)
        up = {r["metric"]["job"]: r["value"][1] for r in prom.query("up")}
        assert up == {"modelcache-controller": "1", "modelcache-node": "1"}, up
        empty = [(title, expr) for title, expr in dashboard_targets()
                 if not prom.query(expr.replace("$__rate_interval", "1m"))]
        assert not empty, f"dashboard queries without data: {empty}"

        groups = prom.api("rules", type="alert")["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        with open(RULES) as f:
            shipped = {r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]}
        assert set(loaded) == shipped
        wait_for(lambda: all(r.get("health") == "ok" for r in prom.api(
            "rules", type="alert")["groups"][0]["rules"]), 10, what="rules evaluated ok")
        # with both up and a leader, nothing fires
        firing = [r["name"] for g in prom.api("rules", type="alert")["groups"]
                  for r in g["rules"] if r["state"] == "firing"]
        assert firing == [], firing
        print(f"\nmonitoring: {time.monotonic() - t0:.1f}s in all, traffic {traffic_s:.1f}s, "
              f"scrapes and queries {time.monotonic() - scraped:.1f}s")
    finally:
        if prom is not None:
            prom.stop()
        plugin.kill()
        cf_.unmount_everything_under(str(tmp_path))
        manager.stop()
        try:
            client.delete(MWC, mwc)
        except k.NotFound:
            pass
        client.close()
