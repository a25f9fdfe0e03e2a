"""bench/scale/nodes.py at a small size, as a correctness test (no timings asserted).

20 kwok nodes, half of them matching the prefetch nodeSelector of 2 Models,
each node run by an agent of the node plugin's own code (the resolver's
informers, ``csi.prefetch.Prefetcher``, ``csi.nodelabels.NodeLabeler``) over
a stand-in cache, as the node plugin's ServiceAccount, against the real
kube-apiserver. When the Models turn Ready, exactly the matching nodes
prefetch each Model, once each, and label their Node with exactly those
digests; the others neither. Idle agents send the API server nothing (watches,
no polling). Needs kwok, built by hack/install.d/kwok.sh, and the kube tools.
"""

from __future__ import annotations

from bench.scale import nodes as bench


def test_scale_nodes_matching_nodes_prefetch_once_and_label() -> None:
    p = bench.Params(nodes=20, models=2, processes=2, idle=3.0, timeout=120.0)
    rep = bench.run(p, say=lambda _: None)
    assert rep.matching == 10
    # every (matching node, Model) pair pulled exactly once; nobody else pulled
    assert rep.pulls_per_pair == {1: rep.matching * p.models}, rep.pulls_per_pair
    assert rep.wrong_pulls == 0
    assert len(rep.ready_to_prefetch) == rep.matching * p.models
    assert min(rep.ready_to_prefetch) > -0.5  # never before Ready (two clocks' skew aside)
    # each matching node carries exactly the two labels; the others none
    assert rep.wrongly_labelled == 0
    assert len(rep.ready_to_labelled) == rep.matching
    # starting: per node a list and a watch of Models, ClusterModels and its own Node
    start = rep.requests[bench.START]
    for what in ("LIST models", "WATCH models", "LIST clustermodels", "WATCH clustermodels",
                 "LIST nodes", "WATCH nodes"):
        assert start[what] == p.nodes, (what, start)
    assert sum(rep.requests[bench.IDLE].values()) == 0, rep.requests[bench.IDLE]
    # labels: GET + PATCH of the own Node only, no more than one pair per prefetch
    ready = rep.requests[bench.READY]
    assert set(ready) <= {"GET nodes", "PATCH nodes"}, ready
    assert 0 < ready["PATCH nodes"] <= rep.matching * p.models, ready
    # the API server saw what the agents say they sent (only the bench writes Models)
    assert rep.server_requests[bench.READY]["PATCH nodes"] == ready["PATCH nodes"]
