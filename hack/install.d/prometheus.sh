#!/usr/bin/env bash
# Prometheus and promtool from Debian's `prometheus` package: the chart's alert rules
# are unit-tested with `promtool test rules` (tests/unit/test_alert_rules.py) and
# tests/integration/test_monitoring.py runs a real Prometheus that scrapes a manager
# and a node plugin. The package's service is not started (the tests start their own).
set -euo pipefail
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && exit 0
export DEBIAN_FRONTEND=noninteractive
# keep the package's own service from starting (and holding :9090) where systemd runs
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
echo "install: apt package prometheus (promtool)"
apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
