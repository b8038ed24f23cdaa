"""`mlsae.verify`: numbers compared within a tolerance, differences named by their path."""

from mlsae.verify import moved


def test_moved_names_what_changed_beyond_the_tolerance():
    old = {"mean": {"fvu": 0.325, "l1": 52.6}, "per_layer": [0.1, 0.2], "model": "smollm2-135m"}
    new = {"mean": {"fvu": 0.327, "l1": 55.0}, "per_layer": [0.1, 0.3], "model": "smollm2-135m"}
    out = moved(old, new)
    # 0.325 -> 0.327 is within 2% + 0.005; 52.6 -> 55 (4.6%) and 0.2 -> 0.3 are not
    assert out == ["mean.l1: 52.6 -> 55", "per_layer[1]: 0.2 -> 0.3"]
    assert moved(old, old) == []
    assert moved({"a": [1, 2]}, {"a": [1]}) == ["a: length 2 -> 1"]
    assert moved({"a": "x"}, {"a": "y", "b": 1}) == ["b: only in one of them", "a: 'x' -> 'y'"]
    assert moved({"a": float("nan")}, {"a": float("nan")}) == []


def test_timings_are_not_results():
    from mlsae.verify import moved

    assert moved({"fvu": 0.3, "build_seconds": 38.8}, {"fvu": 0.3, "build_seconds": 41.4}) == []
    assert moved({"fvu": 0.3}, {"fvu": 0.4}) == ["fvu: 0.3 -> 0.4"]


def test_recorded_run_settings_are_kept_apart_from_results():
    from mlsae.verify import run_settings

    changes = [
        "results/runs/r8-k32.json: config.checkpoint_every: only in one of them",
        "results/runs/r8-k32.json: mean.fvu: 0.315 -> 0.4",
        "results/metrics/runs/r8-k32.json: fvu: 0.315 -> 0.4",
    ]
    results, settings = run_settings(changes)
    assert settings == changes[:1] and results == changes[1:]
