"""The plan's time estimates scale with what a stage will do."""

from dataclasses import replace

import pytest

from kscope.app.plan import RATES, estimate
from kscope.app.reproduce import ReproduceConfig
from kscope.privacy.edit.plan import METHODS


def test_the_erase_estimate_counts_the_points_of_the_grid():
    cfg = ReproduceConfig()
    default = estimate(cfg, "privacy-erase:early-s0")
    every_method = estimate(replace(cfg, erase=replace(cfg.erase, methods=list(METHODS))), "privacy-erase:early-s0")
    assert every_method - default == pytest.approx(12 * RATES["privacy-point"])  # 4 more editors x 3 budgets
    # 62 points on the band, and DEPN, KN erase (3 budgets each) and REVS (its budgets) again at layer 29, the choice layer
    extra = 6 + len(cfg.erase.revs_budgets)
    assert default == pytest.approx(RATES["privacy-erase"] + (62 + extra) * RATES["privacy-point"] + RATES["privacy-attacks"])
    no_attacks = replace(cfg, erase=replace(cfg.erase, attacks=replace(cfg.erase.attacks, attacks=[])))  # "empty: none"
    assert default - estimate(no_attacks, "privacy-erase:early-s0") == pytest.approx(RATES["privacy-attacks"])
