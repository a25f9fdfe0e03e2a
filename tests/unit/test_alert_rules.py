"""The chart's alert rules (charts/modelcache/files/alerts.yaml) under ``promtool``:
``check rules`` (syntax, templates) and ``test rules`` on tests/unit/monitoring/alerts_test.yaml,
where each alert fires on a series that should fire it and not on one that should not.

promtool comes with Debian's ``prometheus`` package (hack/install.d/prometheus.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "charts", "modelcache", "files", "alerts.yaml")
TESTS = os.path.join(ROOT, "tests", "unit", "monitoring", "alerts_test.yaml")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed (hack/install.d/prometheus.sh: apt prometheus)")
    return path


def test_rules_check(promtool: str) -> None:
    done = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_each_alert_fires_and_does_not(promtool: str) -> None:
    done = subprocess.run([promtool, "test", "rules", TESTS], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_test() -> None:
    import yaml

    with open(RULES) as f:
        alerts = {r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]}
    with open(TESTS) as f:
        doc = yaml.safe_load(f)
    fired = {t["alertname"] for case in doc["tests"] for t in case["alert_rule_test"]
             if t.get("exp_alerts")}
    assert fired == alerts
