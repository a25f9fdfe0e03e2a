"""bench/scale's measures, on made-up inputs: a wrong one would misreport the figures
issue 17 asks for (lift order, the API server's mean PATCH latency, webhook quantiles)."""

from __future__ import annotations

from bench.scale import run as scale

READY = {"a": 1.0, "b": 2.0}  # Model a turned Ready before b


def model_of(pod: str) -> str:
    return pod[0]


def test_fifo_by_model_counts_no_pod_out_of_order() -> None:
    lifted = {"a1": 3.0, "a2": 4.0, "b1": 5.0, "b2": 6.0}
    assert scale.out_of_order(lifted, READY, model_of) == (0, 0)


def test_a_later_models_pod_before_an_earlier_ones_is_counted() -> None:
    # b1 went while a1 and a2 (Ready earlier) still waited; after them nothing is owed
    assert scale.out_of_order({"b1": 3.0, "a1": 4.0, "a2": 5.0, "b2": 6.0},
                              READY, model_of) == (1, 1)
    assert scale.out_of_order({"a1": 3.0, "b1": 4.0, "b2": 5.0, "a2": 6.0},
                              READY, model_of) == (2, 1)
    # c (Ready last) first: both a and b still wait
    assert scale.out_of_order({"c1": 2.5, "a1": 3.0, "b1": 4.0},
                              {**READY, "c": 2.5}, model_of) == (1, 2)


def test_sum_count_adds_the_matching_series_only() -> None:
    text = "\n".join([
        "# TYPE d histogram",
        'd_bucket{verb="PATCH",le="0.1"} 2', 'd_bucket{verb="PATCH",le="+Inf"} 3',
        'd_sum{verb="PATCH"} 0.5', 'd_count{verb="PATCH"} 3',
        'd_bucket{verb="GET",le="0.1"} 7', 'd_bucket{verb="GET",le="+Inf"} 7',
        'd_sum{verb="GET"} 9', 'd_count{verb="GET"} 7', ""])
    assert scale.sum_count(text, "d", lambda lb: lb.get("verb") == "PATCH") == (0.5, 3.0)


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.005, 50.0), (0.025, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert scale.histogram_quantile(buckets, 0.5) == 0.005
    assert abs(scale.histogram_quantile(buckets, 0.99) - 0.0925) < 1e-9
