"""Each baseline chooses its layer (the band or one other candidate) on the validation people alone (issue 36)."""

from dataclasses import fields

from kscope.privacy.edit.plan import CHOOSE_LAYER, plan
from kscope.privacy.study.erase import EraseConfig, candidate_layers
from kscope.privacy.study.results import EraseResult, ErasurePoint, Target
from kscope.stats import Interval

# What a choice may read of a point: what it is, and its validation measures. Everything else is the test split's.
SETTING = {"method", "kind", "budget", "n_units", "n_weights", "params", "lam", "tau", "variant", "draw", "layer", "val",
           "by_layer", "units", "expressible", "fit"}
TEST_SIDE = {f.name for f in fields(ErasurePoint)} - SETTING


class Spy(ErasurePoint):
    """A point whose test-split measures cannot be read."""

    def __getattribute__(self, name):
        if name in TEST_SIDE:
            raise AssertionError(f"the choice read the test split's {name}")
        return super().__getattribute__(name)


def _point(cls, layer, val_rel, test_rel, budget=8):
    ci = Interval(0.0, 0.0, 0.0)
    return cls("depn", "neuron", budget, budget, 0, test_rel, test_rel, 1.0, 1.0, 1.0, 1.0, 0.0, ci, layer=layer,
               val={"rel": val_rel, "gen": val_rel, "loc_pararel": 1.0, "loc_private": 1.0, "loc": 1.0, "delta_ppl": 0.0})


def _result(points):
    return EraseResult(model_dir="m", base_model="b", build={}, layers=[28], config={}, n_erased=1, n_kept_private=1,
                       n_unrelated=1, points=points, frontier=[], reach_target=[], target=Target())


def test_the_layer_choice_reads_only_the_validation_people():
    """The spy: a point's test measures raise when read, and the choice still picks the layer validation prefers, even
    where the test people would prefer the other."""
    pts = [_point(Spy, None, 0.2, 0.9), _point(Spy, 29, 0.6, 0.1), _point(Spy, 29, 0.4, 1.0, budget=16)]
    best = _result(pts).best("depn")
    assert best is pts[1] and best.layer == 29
    plain = _result([_point(ErasurePoint, None, 0.6, 0.1), _point(ErasurePoint, 29, 0.2, 0.9)]).best("depn")
    assert plain.layer is None  # the band, where validation says so


def test_every_baseline_is_measured_on_the_band_and_each_candidate():
    methods = ["keyed-features", "depn", "kn-erase", "revs", "feature-edit", "runtime-zero", "gated-clamp", "clamp-all"]
    specs = plan(methods, ["random-neurons"], [8, 64], [2], [2], [1.0], [0.5], False, choice=[2], feature_choice=[0])
    at = {}
    for s in specs:
        at.setdefault(s.method, set()).add(s.layer)
    assert at["keyed-features"] == {None} and at["random-neurons"] == {None}  # handles and controls stay on the band
    assert all(at[m] == {None, 2 if CHOOSE_LAYER[m] == "neuron" else 0} for m in methods if m in CHOOSE_LAYER)
    assert sum(s.method == "depn" for s in specs) == 4  # both budgets at both layers


def test_the_default_candidates_are_the_layer_above_the_band():
    cfg = EraseConfig()
    assert candidate_layers(cfg, 30) == ([29], [])  # SmolLM2: band 28, the strongest read-out 29; no second SAE
    assert candidate_layers(cfg, 29) == ([], [])
    cfg.layers, cfg.choice_layers, cfg.feature_choice_layers = [1], [1, 0], [2, 1]
    assert candidate_layers(cfg, 3) == ([0], [2])  # band layers are the band's own candidate
