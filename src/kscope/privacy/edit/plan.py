"""The points ``privacy erase`` measures and the editor each one is: a method, a budget and (where it has one) a
strength, over the located units."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kscope.model.sites import down_proj_weight
from kscope.privacy.edit.editors import RuntimeFeatureEdit, WeightEdit, feature_edit, projection_removal, zero_columns
from kscope.privacy.edit.guardrail import ClampAll, GatedClamp, sequence_threshold
from kscope.privacy.edit.keyed import Handle, keyed_edit
from kscope.privacy.edit.revs import revs
from kscope.units.base import FeatureUnits

KEYED = ("keyed-unrestricted", "keyed-features", "keyed-neurons", "keyed-neurons-params")
NEURON_METHODS = ("depn", "kn-erase", "revs")
FEATURE_METHODS = ("feature-edit", "feature-project", "runtime-zero", "runtime-negative", "gated-clamp", "clamp-all",
                   "gated-clamp-resid")
METHODS = KEYED + NEURON_METHODS + FEATURE_METHODS
# The default run leaves out four editors that add no verdict to the others (each selectable with --method): feature-project
# and runtime-negative fail or break as FeatureEdit and the clamps do, clamp-all is kscope's earlier variant of the gated
# clamp, and gated-clamp-resid needs a residual SAE.
NOT_BY_DEFAULT = ("feature-project", "runtime-negative", "clamp-all", "gated-clamp-resid")
# Baselines that choose their layer (the band or one other candidate) on the validation people: the neuron editors among
# --choice-layers, the SAE editors among --feature-choice-layers (each needs an SAE there).
CHOOSE_LAYER = {**dict.fromkeys(NEURON_METHODS, "neuron"), **{m: "feature" for m in FEATURE_METHODS if m != "gated-clamp-resid"}}
DEFAULT_METHODS = tuple(m for m in METHODS if m not in NOT_BY_DEFAULT)
CONTROLS = ("keyed-random-directions", "keyed-random-columns", "random-neurons", "random-features", "mlp-zero", "mlp-zero-all")
WEIGHT_METHODS = KEYED + ("depn", "kn-erase", "revs", "feature-edit", "feature-project")


@dataclass
class Spec:
    method: str
    kind: str  # keyed, neuron, feature, control
    budget: int = 0
    lam: float | None = None
    tau: float | None = None
    variant: str = ""
    draw: int = 0  # random controls: which draw of the random units or directions
    layer: int | None = None  # a baseline at one candidate layer instead of the band


def _draw(seed: str, draw: int) -> str:
    """A random control's seed for ``draw`` (draw 0 keeps the seed the single-draw runs had)."""
    return f"{seed}:draw{draw}" if draw else seed


@dataclass
class Located:
    """Everything the editors act on: each ranking as ``(layer, unit)`` lists, the unit sets, and the keyed solver's
    inputs (rows, preserved moments, target)."""

    layers: list[int]
    rankings: dict[str, list[tuple[int, int]]]
    feats: dict[int, FeatureUnits]
    resid_feats: dict[int, FeatureUnits] = field(default_factory=dict)
    scales: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # gated clamp: per site kind, per layer
    keyed: tuple | None = None  # (rows, moments, z, config, memo of the unedited model's activations at the keys)
    widths: dict[int, tuple[int, int]] = field(default_factory=dict)  # per layer: (d_model, d_mlp)
    retain: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=dict)  # gated clamp: retain sequences' site acts
    gate_percentile: float = 95.0  # gated clamp: the sequence threshold's percentile over the retain sequences
    clamp: float = 2.0  # the clamps: located features set to -clamp x their scale
    gate: float = 0.5  # clamp-all: a token is clamped where a located feature fires above gate x its scale


def plan(methods: Sequence[str], controls: Sequence[str], neuron_budgets: Sequence[int], feature_budgets: Sequence[int],
         revs_budgets: Sequence[int], lams: Sequence[float], taus: Sequence[float], raw_location: bool, draws: int = 1,
         choice: Sequence[int] = (), feature_choice: Sequence[int] = ()) -> list[Spec]:
    """Every point, in the order they are measured; each random control ``draws`` times (its units or directions drawn
    anew each time). A baseline of ``CHOOSE_LAYER`` is measured on the band and again at each other candidate layer
    (``choice`` for neuron editors, ``feature_choice`` for SAE editors), so that its best point, chosen on the
    validation people alone (``EraseResult.best``), also chooses its layer."""
    out: list[Spec] = []
    for m in methods:
        at = [None, *({"neuron": choice, "feature": feature_choice}[CHOOSE_LAYER[m]] if m in CHOOSE_LAYER else ())]
        if m == "keyed-unrestricted":
            out += [Spec(m, "keyed", 0, lam) for lam in lams]
        elif m in KEYED:
            out += [Spec(m, "keyed", b, lam) for b in feature_budgets for lam in lams]
        elif m == "revs":
            out += [Spec(m, "neuron", b, layer=L) for L in at for b in revs_budgets]
        elif m in NEURON_METHODS:
            out += [Spec(m, "neuron", b, layer=L) for L in at for b in neuron_budgets]
        elif m == "feature-edit":
            out += [Spec(m, "feature", b, tau=t, layer=L) for L in at for b in feature_budgets for t in taus]
        else:
            out += [Spec(m, "feature", b, layer=L) for L in at for b in feature_budgets]
    if raw_location:  # the specificity steps' effect: the middle budget and strength located on raw scores
        mid_b, mid_l = list(feature_budgets)[len(feature_budgets) // 2], list(lams)[len(lams) // 2]
        out += [Spec(m, "keyed", mid_b, mid_l, variant="raw location") for m in ("keyed-features", "keyed-neurons") if m in methods]
    for c in controls:
        if c in ("keyed-random-directions", "keyed-random-columns"):
            out += [Spec(c, "control", b, lam, draw=d) for d in range(draws) for b in feature_budgets for lam in lams]
        elif c == "random-neurons":
            out += [Spec(c, "control", b, draw=d) for d in range(draws) for b in neuron_budgets]
        elif c == "random-features":
            out += [Spec(c, "control", b, draw=d) for d in range(draws) for b in feature_budgets]
        else:
            out.append(Spec(c, "control", 0))
    return out


def lowest_edited(method: str, layers: Sequence[int], resid_layers: Sequence[int] = (), layer: int | None = None) -> int:
    """The lowest block a method's edit touches (observations replay the blocks below it); ``layer``: a baseline's
    candidate layer in place of the band."""
    if method == "mlp-zero-all":
        return 0
    if layer is not None:
        return layer
    return min([*layers, *resid_layers]) if method == "gated-clamp-resid" else min(layers)


def _by_layer(units: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    by: dict[int, list[int]] = {}
    for L, u in units:
        by.setdefault(L, []).append(u)
    return by


def equal_params(s: int, d_model: int, d_mlp: int) -> int:
    """Neurons with the parameters of ``s`` directions: ``s x d_mlp = n x d_model``."""
    return max(1, round(s * d_mlp / d_model))


def units_of(spec: Spec, loc: Located) -> list[tuple[int, int]]:
    """The located units a point edits."""
    b = spec.budget
    raw = "-raw" if spec.variant == "raw location" else ""
    d, m = next(iter(loc.widths.values()))
    if spec.method == "keyed-random-columns":  # as many columns per layer as the neurons at equal parameters, drawn at random
        n = equal_params(b, d, m)
        counts = _by_layer(loc.rankings["neurons"][:n])
        return [(L, u) for L, idx in sorted(counts.items())
                for u in random.Random(_draw(f"random-columns:{L}:{n}", spec.draw)).sample(range(loc.widths[L][1]), len(idx))]
    table = {"keyed-features": ("features" + raw, b), "keyed-neurons": ("neurons" + raw, b),
             "keyed-neurons-params": ("neurons", equal_params(b, d, m)), "keyed-random-directions": ("features", b),
             "depn": ("depn", b), "kn-erase": ("kn-erase", b),
             "random-neurons": ("random-neurons", b), "random-features": ("random-features", b),
             "gated-clamp-resid": ("features-resid", b)}
    if spec.layer is not None:  # a baseline at one candidate layer: the rankings located there alone
        name = {"depn": "depn", "kn-erase": "kn-erase"}.get(spec.method, "features")
        return loc.rankings[f"{name}@{spec.layer}"][:b]
    if spec.method in table:
        name, n = table[spec.method]
        if spec.method in ("random-neurons", "random-features") and spec.draw:
            name = f"{name}:draw{spec.draw}"
        return loc.rankings[name][:n]
    if spec.method in FEATURE_METHODS:
        return loc.rankings["features"][:b]
    return []


def make_editor(lm, spec: Spec, loc: Located, all_layers: int, erase_facts, revs_cfg):
    """``(units, editor, params)`` of a point; ``editor.applied(model)`` puts it on and takes it off exactly."""
    model = lm.model
    method = spec.method
    if method in ("mlp-zero", "mlp-zero-all"):
        layers = loc.layers if method == "mlp-zero" else range(all_layers)
        units = [(L, n) for L in layers for n in range(down_proj_weight(model, L).shape[1])]
        return units, WeightEdit(method, zero_columns(model, units)), 0
    if method == "revs":
        new, touched = revs(lm, erase_facts, loc.layers if spec.layer is None else [spec.layer], spec.budget, revs_cfg)
        return sorted(touched), WeightEdit(method, new), 0
    units = units_of(spec, loc)
    by = _by_layer(units)
    if method.startswith("keyed-"):
        rows, moments, z, kcfg, unedited = loc.keyed
        if method == "keyed-unrestricted":
            handle = Handle("unrestricted", {})
        elif method in ("keyed-features", "keyed-random-directions"):
            dirs = {L: loc.feats[L].decoder[idx].detach().float() for L, idx in by.items()} if method == "keyed-features" else \
                {L: _random_directions(loc.widths[L][0], len(idx), _draw(f"{method}:{L}:{spec.budget}", spec.draw)) for L, idx in by.items()}
            handle = Handle("directions", dirs, {L: loc.feats[L] for L in by} if method == "keyed-features" else None)
        else:
            handle = Handle("columns", by, {L: None for L in by})
        new, params, share = keyed_edit(lm, rows, loc.layers, handle, moments, spec.lam, kcfg, z, unedited)
        return units, WeightEdit(method, new, expressible=share), params
    if method in ("depn", "kn-erase", "random-neurons"):
        return units, WeightEdit(method, zero_columns(model, units)), 0
    if method in ("gated-clamp", "gated-clamp-resid"):
        kind, fs = ("mlp.out", loc.feats) if method == "gated-clamp" else ("resid.post", loc.resid_feats)
        return units, GatedClamp({L: (fs[L], idx, loc.scales[kind][L][idx],
                                      sequence_threshold(fs[L], loc.retain.get(kind, {}).get(L, []), idx, loc.gate_percentile))
                                  for L, idx in by.items()}, loc.clamp), 0
    if method == "clamp-all":
        feats_s = {L: (loc.feats[L], idx, loc.scales["mlp.out"][L][idx]) for L, idx in by.items()}
        return units, ClampAll(feats_s, loc.gate, loc.clamp), 0
    feats = {L: (loc.feats[L], idx) for L, idx in by.items()}
    if method in ("runtime-zero", "random-features"):
        return units, RuntimeFeatureEdit(feats), 0
    if method == "runtime-negative":
        return units, RuntimeFeatureEdit(feats, negative=2.0), 0
    directions = {L: loc.feats[L].decoder[idx].detach() for L, idx in by.items()}
    if method == "feature-edit":
        return units, WeightEdit(method, feature_edit(model, directions, spec.tau)), 0
    return units, WeightEdit(method, projection_removal(model, directions)), 0


def _random_directions(d: int, n: int, seed: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(random.Random(seed).randrange(2**31))
    return torch.randn(n, d, generator=g)


def random_ranking(widths: dict[int, int], n: int, seed: str) -> list[tuple[int, int]]:
    """``n`` distinct ``(layer, unit)`` pairs drawn uniformly over the layers' units."""
    pool = [(L, u) for L, w in widths.items() for u in range(w)]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def count_by_layer(units) -> dict[int, int]:
    """How many of ``units`` (``(layer, index)`` pairs) each layer holds."""
    out: dict[int, int] = {}
    for L, _ in units:
        out[L] = out.get(L, 0) + 1
    return dict(sorted(out.items()))
