"""bench/scale at a small size, as a correctness test (no timings asserted).

50 kwok nodes, 20 Models, 500 annotated pods at 100/s, through the real
kube-apiserver + etcd, the real manager (webhook registered by URL) and a
real registry: every pod is admitted and mutated (gate + CSI volume), every
gate is lifted once its Model turns Ready (the manager's own Ready write,
from ``modelcache.io/imported-digest``), and the manager makes at most two
API requests per pod (counted from the API server's audit log: no per-pod
polling). Needs kwok, built by hack/install.d/kwok.sh, and the kube tools.
"""

from __future__ import annotations

from bench.scale import run as scale


def test_scale_small_every_pod_mutated_and_lifted() -> None:
    p = scale.Params(nodes=50, models=20, pods=500, rate=100.0, timeout=120.0)
    rep = scale.run(p, say=lambda _: None)
    assert rep.pods_mutated == p.pods
    assert rep.models_ready == p.models
    assert rep.pods_lifted == p.pods
    assert len(rep.ready_to_lift) == p.pods
    # lifted after Ready, never before (run() also fails if any lifted while all were Pending)
    assert min(rep.ready_to_lift) > -0.5  # two watches on one clock: allow their skew
    # every node caches the digest: each lift merged the preferred node affinity
    assert rep.pods_with_affinity == p.pods
    assert rep.requests_per_pod() <= 2, rep.requests
    # nodes heartbeating and being labelled cost the manager no API requests
    assert sum(rep.requests["nodes"].values()) == 0, rep.requests["nodes"]
    assert sum(rep.requests["node labels"].values()) == 0, rep.requests["node labels"]
    # admission reads caches only (the Models' own Events may still trickle in meanwhile)
    assert not [w for w in rep.requests["pods created"] if " pods" in w], \
        rep.requests["pods created"]
