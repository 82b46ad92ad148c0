"""The sweep's cells: per layer, site and protocol, each unit set's effects over facts and the verdicts between them.

A unit set's strength on a fact is how far editing its top-k units moves log P(answer) the expected way:
``-log P'/P`` suppressed, ``+log P'/P`` enhanced (``both``, their mean, is descriptive only). Features are compared
with every other unit set of the cell (the layer's MLP neurons, the paper's comparison, and the same-site baselines),
and neurons and features with their random and matched random controls; all paired over facts, CR2 over relations,
each comparison one verdict on suppress and enhance judged apart (``verdicts.ops_verdict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from kscope.analyses.verdicts import MARGINS, OPS, Verdict, adjust, ops_verdict
from kscope.locate.conditions import CONTROLLED, SetEffects, SetSummary, summarize_effects

LABELS = {"neuron": "neurons", "feature": "features", "basis": "basis", "pca": "PCA", "random": "random directions"}
"""How each unit set is named in verdicts and tables ("random" is the random-direction baseline, not a control)."""
CONTROLS = ("random", "matched")


@dataclass
class Cell:
    """One layer x site x protocol. ``units``: per unit set over facts (``neuron``: the layer's MLP neurons; ``feature``:
    the SAE at the site; ``basis`` / ``pca`` / ``random``: same-site baselines). ``verdicts[comparison][k]``:
    ``feature vs <set>`` for every other set, ``<kind> vs <random|matched> <kind>`` for neurons and features (top
    units against their controls), each on suppress and enhance apart (its ``ops``)."""

    layer: int
    site: str
    selection: str
    ablation: str
    units: dict[str, SetSummary]
    verdicts: dict[str, dict[int, Verdict]] = field(default_factory=dict)


def control_key(kind: str, control: str) -> str:
    """The verdict of a kind's top units against its random or matched random units, e.g. ``feature vs matched feature``."""
    return f"{kind} vs {control} {kind}"


def strength(grid: dict[str, dict[int, object]], op: str, k: int) -> float:
    """How far the edit moves log P(answer) the expected way (``grid[op][k]`` holds effects with a ``log``)."""
    return grid[op][k].log if op == "enhance" else -grid[op][k].log


def build_cell(layer: int, site: str, selection: str, ablation: str, rows: dict[str, Sequence[SetEffects]], clusters: Sequence[str],
               ks: Sequence[int]) -> Cell:
    """A cell from per-fact effects of each unit set (``rows[kind][i]`` is fact ``i``'s)."""
    cell = Cell(layer, site, selection, ablation, {kind: summarize_effects(r, clusters) for kind, r in rows.items()})

    def add(name: str, a: Sequence[dict], b: Sequence[dict], names: Sequence[str]) -> None:
        for k in ks:
            cell.verdicts.setdefault(name, {})[k] = ops_verdict({op: [strength(g, op, k) for g in a] for op in OPS},
                                                                {op: [strength(g, op, k) for g in b] for op in OPS},
                                                                clusters, names, MARGINS["log"])

    feats = [r.top for r in rows["feature"]]
    for kind, r in rows.items():
        if kind != "feature":
            add(f"feature vs {kind}", feats, [x.top for x in r], (LABELS["feature"], LABELS[kind]))
    for kind in CONTROLLED:
        for control in CONTROLS:
            got = [getattr(x, control) for x in rows[kind]]
            if all(got):
                add(control_key(kind, control), [x.top for x in rows[kind]], got, (f"top {LABELS[kind]}", f"{control} {LABELS[kind]}"))
    return cell


def adjust_tables(cells: Iterable[Cell]) -> None:
    """Holm over each verdict table: one comparison, protocol and k across every layer and site (each op's verdicts
    over the same table)."""
    families: dict[tuple, list[Verdict]] = {}
    for c in cells:
        for name, by_k in c.verdicts.items():
            for k, v in by_k.items():
                families.setdefault((name, c.selection, c.ablation, k), []).append(v)
    for family in families.values():
        adjust(family)
