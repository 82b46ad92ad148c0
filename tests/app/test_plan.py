"""The plan's time estimates scale with what a stage will do."""

from dataclasses import replace

import pytest

from kscope.app.plan import RATES, TRACE_BLOCKS, estimate
from kscope.app.options import config_from_file
from kscope.app.reproduce import ReproduceConfig
from kscope.privacy.edit.plan import METHODS


def test_the_erase_estimate_counts_the_points_of_the_grid():
    cfg = ReproduceConfig()
    default = estimate(cfg, "privacy-erase:early-s0")
    every_method = estimate(replace(cfg, erase=replace(cfg.erase, methods=list(METHODS))), "privacy-erase:early-s0")
    point = RATES["privacy-point"] + 2 * RATES["privacy-point-block"]  # band 28, choice layer 29: two blocks replayed
    assert every_method - default == pytest.approx(12 * point)  # 4 more editors x 3 budgets
    # 62 points on the band, and DEPN, KN erase (3 budgets each) and REVS (its budgets) again at layer 29, the choice layer
    extra = 6 + len(cfg.erase.revs_budgets)
    fixed = RATES["privacy-erase"] + RATES["privacy-trace"] + RATES["privacy-location"]
    assert default == pytest.approx(fixed + (62 + extra) * point + RATES["privacy-attacks"])
    no_attacks = replace(cfg, erase=replace(cfg.erase, attacks=replace(cfg.erase.attacks, attacks=[])))  # "empty: none"
    assert default - estimate(no_attacks, "privacy-erase:early-s0") == pytest.approx(RATES["privacy-attacks"])


def test_the_erase_estimate_scales_with_the_band_the_trace_and_relearning():
    """A band from layer 6 replays 24 blocks per point; the whole-block trace and 40 relearning steps cost more: the
    deep-erasure config's estimate is within a fifth of an erase stage it was not fitted to (seed 2's, 1,414 s)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    deep = config_from_file(ReproduceConfig, str(root / "configs" / "deep-erasure.yaml"))
    base = ReproduceConfig()
    blocks = replace(base, erase=replace(base.erase, trace_blocks=True))
    assert estimate(blocks, "privacy-erase:early-s0") - estimate(base, "privacy-erase:early-s0") == pytest.approx(
        RATES["privacy-trace"] * (TRACE_BLOCKS - 1))
    assert abs(estimate(deep, "privacy-erase:early-s2") - 1414) < 0.2 * 1414  # seed 2's stage (alone), never fitted
    assert estimate(deep, "privacy-erase:early-s0", depth=30) == estimate(deep, "privacy-erase:early-s0")  # SmolLM2: 30 layers
    low = replace(base, erase=replace(base.erase, layers=[6]))  # with the depth known, each point replays 6..29, not 6..7
    points = (estimate(low, "privacy-erase:early-s0", depth=30) - estimate(low, "privacy-erase:early-s0")) / (
        22 * RATES["privacy-point-block"])
    assert points == pytest.approx(round(points)) and round(points) > 10
