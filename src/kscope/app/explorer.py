"""A static explorer of a run (opens from disk, no server): per fact, its unit sets side by side with their top units
and ΔP bars on one scale; per unit (neurons, features and the same-site baselines), a dashboard: logit effects,
activation density, a histogram with axes, top contexts centred on the activating token, its explanation and score,
the facts it serves; an index with a client-side search over units and facts; the study's figures.

``sae-dashboard`` needs a TransformerLens model, which a GGUF/HF-only model is not, so this is a small template.
Every page checks itself after loading (images decoded, tables filled, no script error) and writes the
verdict to ``<body data-check>``, which the browser test reads.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from kscope.analyses.autointerp import InterpretConfig, InterpretResult, TokenExplainer, interpretability_score, record_many
from kscope.app import explorer_pages as pages
from kscope.app import privacy_pages
from kscope.config import Config, nested, option
from kscope.errors import KscopeError
from kscope.io import check_writable, read_json, write_text
from kscope.locate.compare import CompareResult
from kscope.model.loading import ModelConfig, load_model, same_model
from kscope.model.sites import Site, down_proj_weight, final_norm
from kscope.plots import unit_color
from kscope.privacy.study.results import EraseResult
from kscope.progress import make_progress
from kscope.units.base import FeatureUnits, Units
from kscope.units.corpus import CorpusConfig, build_corpus
from kscope.units.decompositions import LinearDictUnits
from kscope.units.provision import BaselineConfig, neuron_units, site_baselines
from kscope.units.sae import feature_units, load_sae


@dataclass
class ExploreConfig(Config):
    """Build a static HTML explorer of a run directory (made by `kscope reproduce` or `kscope compare --out DIR/compare.json`),
    from the run's own model, SAEs and corpus."""

    run_dir: str | None = option(help="Run directory holding compare.json (and, if present, interpret.json and figures).", required=True,
                                 output="dir")
    units_per_fact: int = option(5, "Top neurons and features per fact and layer to give a page.", min=1)
    contexts: int = option(8, "Top-activating contexts shown per unit.", min=1)
    model: str | None = option(None, "The run's model (default: the one its compare.json names); another model is refused.")
    runtime: ModelConfig = nested(ModelConfig, hide=("model", "dtype"))  # --device, --cache-dir; the model and dtype are the run's
    interpret: InterpretConfig = nested(InterpretConfig, prefix="is-", hide=("top_contexts", "heldout_frac", "explanation_tokens",
                                                                             "llm_url", "llm_model", "seed"))

    def written_inside(self) -> list[str]:
        """The explorer's directory, replaced whole; the run's results beside it are its inputs."""
        return ["explorer"]


def _known(cls: type, values: dict) -> Config:
    """``cls`` from a run's recorded options (those this version no longer has are ignored)."""
    return cls(**{k: v for k, v in values.items() if k in {f.name for f in fields(cls)}})


def run_inputs(cfg: ExploreConfig, res: CompareResult) -> tuple[ModelConfig, CorpusConfig]:
    """The model and corpus the run was made with (``--model`` must name the run's model; ``--device``/``--cache-dir`` apply)."""
    made = res.config.get("model", {})
    run_model = made.get("model", res.model)
    if cfg.model is not None and not same_model(cfg.model, run_model):
        raise KscopeError(f"--model {cfg.model}: the run {cfg.run_dir} was made with {run_model!r}; leave --model out to use it")
    model = ModelConfig(run_model, cfg.runtime.device, made.get("dtype", "float32"), cfg.runtime.cache_dir or made.get("cache_dir"))
    return model, _known(CorpusConfig, res.config.get("corpus", {}))


def _rel(loc) -> dict | None:
    """Relative ΔP of the top-k edits, per op and k."""
    return {op: {k: e.rel for k, e in by_k.items()} for op, by_k in loc.effects.top.items()} if loc.effects else None


def unit_file(layer: int, kind: str, unit: int) -> str:
    return f"units/L{layer}-{kind}-{unit}.html"


def directions(lm, units: Units, idx: list[int]) -> tuple[torch.Tensor, str]:
    """``[len(idx), d_model]``: what one unit of activation writes to the residual stream (neurons: their down-projection
    column; features: their decoder direction; PCA / random directions: their direction; the basis: its coordinate),
    and how it was read."""
    ix = torch.as_tensor(idx, dtype=torch.long)
    if isinstance(units, FeatureUnits):
        return units.decoder.detach().float().cpu()[ix], "the feature's decoder direction"
    if isinstance(units, LinearDictUnits):
        return units.dec.detach().float().cpu()[ix], f"the {units.kind} direction"
    if units.kind == "neuron":
        return down_proj_weight(lm.model, units.site.layer).detach().float().cpu().T[ix], "the neuron's down-projection column"
    d = units.n_units
    return torch.eye(d)[ix], "the site's own coordinate"


def unembedding(lm) -> torch.Tensor | None:
    """``W_U`` ``[vocab, d_model]`` with the final norm's weight folded in (what a direction added to the last residual
    state does to the logits, norm scale aside); None if the model has no linear output head."""
    head = lm.model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        return None
    w = head.weight.detach().float().cpu()
    try:
        g = getattr(final_norm(lm.model), "weight", None)
    except KscopeError:  # no final norm: plain W_U
        g = None
    return w * g.detach().float().cpu()[None] if g is not None and g.shape[-1] == w.shape[1] else w


def logit_effects(lm, w_u: torch.Tensor | None, dirs: torch.Tensor, n: int = 10) -> list[tuple[list, list]]:
    """Per direction, the ``n`` tokens it promotes most and least: one ``dirs @ W_U.T`` matmul for the whole set."""
    if w_u is None or dirs.shape[1] != w_u.shape[1]:
        return [([], []) for _ in range(dirs.shape[0])]
    logits = dirs @ w_u.T
    top, bot = logits.topk(n, dim=1), (-logits).topk(n, dim=1)
    dec = lambda ids, vals: [(lm.tokenizer.decode([i]), float(v)) for i, v in zip(ids.tolist(), vals.tolist())]  # noqa: E731
    return [(dec(top.indices[j], top.values[j]), dec(bot.indices[j], -bot.values[j])) for j in range(dirs.shape[0])]


def _unit_sets(lm, res: CompareResult, model: ModelConfig, corpus: CorpusConfig, progress) -> dict[tuple[int, str], Units]:
    """Every unit set the run located units in: the layer's neurons, its SAE's features, the same-site baselines."""
    out: dict[tuple[int, str], Units] = {}
    layers = sorted({L for f in res.facts for L in f.layers})
    for L in layers:
        out[(L, "neuron")] = neuron_units(lm, L)
        if L in res.saes:
            info = res.saes[L]
            out[(L, "feature")] = feature_units(lm.model, load_sae(info.path, model.device), Site.parse(info.site))
    base_cfg = _known(BaselineConfig, res.config.get("baselines", {}))
    wanted = {k for f in res.facts for e in f.layers.values() for k in e} & set(base_cfg.baselines)
    if wanted:
        base_cfg.baselines = [b for b in base_cfg.baselines if b in wanted]
        site = res.config.get("feature_site", "mlp.out")
        outlier = res.config.get("sae_train", {}).get("outlier_factor", 10.0)
        got = site_baselines(lm, [Site(L, site) for L in layers], base_cfg, corpus, outlier, model.cache_dir, progress)
        for s, units in got.items():
            for u in units:
                out[(s.layer, u.kind)] = u
    return out


def _interpreted(run: Path) -> dict[tuple[int, str, int], tuple]:
    interp = InterpretResult.load(run / "interpret.json") if (run / "interpret.json").exists() else None
    if interp is None:
        return {}
    return {(interp.layer, kind, u.unit): (u.explanation, u.score, f"{r.explainer}, the run's interpret stage")
            for kind, r in interp.results.items() for u in r.rows}


def build_explorer(cfg: ExploreConfig) -> Path:
    """Write ``<run_dir>/explorer/`` and return its index page."""
    run = Path(cfg.run_dir or "")
    if not (run / "compare.json").exists():
        raise KscopeError(f"{run} holds no compare.json; run `kscope reproduce` or `kscope compare --out {run}/compare.json` first")
    res = CompareResult.load(run / "compare.json")
    if not res.facts:
        raise KscopeError(f"{run}/compare.json holds no per-fact results")
    model, corpus = run_inputs(cfg, res)
    inputs = [*model.reads(), *corpus.reads(), *(info.path for info in res.saes.values()), run / "compare.json", run / "interpret.json",
              run / "sweep" / "sweep.json", *run.glob("privacy-*.json")]
    check_writable(run / "explorer", inputs, directory=True, writes=["."], flag="--run-dir")
    explained = _interpreted(run)
    out = run / "explorer"
    lm = load_model(model)
    wanted: dict[tuple[int, str], list[int]] = {}
    facts_of: dict[tuple[int, str, int], list[tuple[int, float, int]]] = {}
    for i, f in enumerate(res.facts):
        for L, entry in f.layers.items():
            for kind, loc in entry.items():
                lst = wanted.setdefault((L, kind), [])
                for r, u in enumerate(loc.top[: cfg.units_per_fact]):
                    lst += [u.unit] if u.unit not in lst else []
                    facts_of.setdefault((L, kind, u.unit), []).append((i, u.score, r + 1))
    with make_progress() as progress:
        sets = _unit_sets(lm, res, model, corpus, progress)
        picks = [(key, sets[key], idx) for key, idx in wanted.items() if key in sets]
        _, texts = build_corpus(lm, corpus, progress, model.cache_dir).split()
        records = record_many(lm, [(u, idx) for _, u, idx in picks], texts, cfg.interpret, progress)
    w_u = unembedding(lm)
    explainer, entries, made = TokenExplainer(), [], set()
    for ((L, kind), units, idx), rec in zip(picks, records):
        dirs, how = directions(lm, units, idx)
        logits = logit_effects(lm, w_u, dirs)
        lengths = torch.tensor([len(t) for t in rec.tokens])
        valid = torch.arange(rec.acts.shape[1])[None, :] < lengths[:, None]
        for c, unit in enumerate(idx):
            a = rec.acts[..., c]
            peak = float(a.abs().max())
            active = a[valid][a[valid].abs() > 0.01 * peak] if peak > 0 else a[:0, 0]
            order = torch.argsort(a.abs().amax(1), descending=True)[: cfg.contexts].tolist()
            e = explained.get((L, kind, unit))
            if e is None and peak > 0:  # every top unit gets an explanation and a score (offline token explainer)
                got = interpretability_score(rec, c, explainer, cfg.interpret)
                e = (got["explanation"], got["score"], "TokenExplainer, scored by the explorer")
            text = ", ".join(map(str, e[0])) if e and isinstance(e[0], dict) else (str(e[0]) if e else "")
            fs = [(i, f"{res.facts[i].subject} → {res.facts[i].object}", score, rank, _dp_line(res.facts[i].layers[L][kind]))
                  for i, score, rank in facts_of.get((L, kind, unit), [])]
            u = dict(layer=L, kind=kind, unit=unit, site=units.site.name, density=float(active.numel()) / max(1, int(valid.sum())),
                     n_tokens=int(valid.sum()), peak=peak, logits=logits[c], direction=how,
                     hist=pages.histogram(active, unit_color(kind)), explanation=e, facts=fs,
                     contexts=[pages.centred(rec.tokens[w], a[w, : len(rec.tokens[w])].tolist(), peak) for w in order])
            write_text(out / unit_file(L, kind, unit), pages.unit_page(u))
            made.add((L, kind, unit))
            entries.append(dict(t="unit", k=f"L{L} layer {L} {kind}", n=f"L{L} {kind} {unit}", h=unit_file(L, kind, unit),
                                x=f"{100 * u['density']:.2f} % dense; {text[:120]}"))
    link = lambda L, kind, unit: (f'<a href="{unit_file(L, kind, unit)}">{unit}</a>' if (L, kind, unit) in made  # noqa: E731
                                  else str(unit))
    heat = sweep_per_fact(run)
    for i, f in enumerate(res.facts):
        write_text(out / f"fact-{i}.html", fact_page(f, link, heat.get(f.uid)))
        entries.append(dict(t="fact", k=f.relation, n=f"{f.subject} → {f.object}", h=f"fact-{i}.html",
                            x=f"{f.relation}; {len(f.prompts)} prompts"))
    erased = privacy_results(run)
    people = privacy_pages.write_privacy_pages(out, erased)
    entries += [dict(t="person", k=f"privacy {name}", n=f"{who} ({name})", h=privacy_pages.person_file(name, who),
                     x=privacy_pages.outcome_line(r, who)) for name, r in erased.items() for who in privacy_pages.graded_people(r)]
    figs = "".join(f'<h2>{p.stem}</h2><img src="../{p.name}" alt="{p.stem}">' for p in sorted(run.glob("*.png")))
    write_text(out / "search.js", pages.search_index(entries))
    intro = (f"<p>{res.n_facts} facts, model {html.escape(res.model)}; {len(made)} unit pages "
             f"({', '.join(f'{pages.swatch(k)}{html.escape(k)}' for k in dict.fromkeys(k for _, k, _ in made))}). Search by "
             "layer (L12), kind, unit number, explanation tokens, subject, object or relation.</p>"
             + ('<p><a href="privacy/index.html">Erased people</a>: per privacy model and test person, the located units, '
                "each method's outcome on each secret and the attacks.</p>" if people is not None else ""))
    return write_text(out / "index.html", pages.index_page(intro, figs))


def fact_page(f, link, swept: dict[str, float] | None) -> str:
    """A fact: its prompts, per layer its unit sets side by side on one ΔP scale, and its top units across layers (the
    sweep's per-fact effects, else the run's own layers when it located at several)."""
    vals = [abs(v) for entry in f.layers.values() for loc in entry.values() for by_k in (_rel(loc) or {}).values()
            for v in by_k.values() if v == v]
    scale = max(vals, default=0.0)
    parts = [f"<p>{html.escape(f.relation)}: <b>{html.escape(f.subject)}</b> → <b>{html.escape(f.object)}</b> "
             f"(scored token {html.escape(repr(f.target_token))})</p><ul>"
             + "".join(f"<li>{html.escape(p)}</li>" for p in f.prompts) + "</ul>"]
    grid, caption = layer_grid(f, swept)
    if grid:
        parts.append(f"<h2>Across layers</h2>{pages.heat_map(grid, caption)}")
    for L, entry in f.layers.items():
        parts.append(f"<h2>Layer {L}</h2>{pages.side_by_side(L, entry, link, scale)}")
    return pages.page(f"{f.subject} → {f.object}", "".join(parts))


def layer_grid(f, swept: dict[str, float] | None) -> tuple[dict[str, dict[int, float]], str]:
    """Rows (unit set) x layers of the fact's ΔP/P with its top units suppressed, and where they come from: the sweep's
    per-fact record (``"<layer>/<site>/<kind>"`` keys) when it has one, else the run's own layers if there are two or
    more; empty otherwise (the page then shows no heat map)."""
    grid: dict[str, dict[int, float]] = {}
    if swept:
        for key, v in swept.items():
            L, site, kind = key.split("/", 2)
            grid.setdefault(kind if site == "mlp.neurons" else f"{kind} @ {site}", {})[int(L)] = v
        return grid, ("ΔP/P of the answer when each set's top-k units (the sweep's selection, SAE error term kept) are "
                      "suppressed, on the fact's held-out prompts where the sweep split them")
    if len(f.layers) < 2:
        return {}, ""
    for L, entry in f.layers.items():
        for kind, loc in entry.items():
            sup = (_rel(loc) or {}).get("suppress")
            if sup:
                grid.setdefault(kind, {})[L] = sup[max(sup)]
    k = max((max(b) for e in f.layers.values() for loc in e.values() for b in (_rel(loc) or {}).values() if b), default=0)
    return grid, f"ΔP/P of the answer when each set's top-{k} units at each layer of this run are suppressed"


def sweep_per_fact(run: Path) -> dict[str, dict[str, float]]:
    """The sweep's per-fact effects, fact uid -> ``"<layer>/<site>/<kind>"`` -> ΔP/P with that set's top-k suppressed,
    if ``<run>/sweep/sweep.json`` records them (``per_fact``); {} otherwise."""
    path = run / "sweep" / "sweep.json"
    try:
        data = read_json(path) if path.exists() else {}
    except KscopeError:
        return {}
    if not str(data.get("schema", "")).startswith("kscope.sweep/"):
        return {}
    return {uid: {k: float(v) for k, v in row.items() if v is not None} for uid, row in (data.get("per_fact") or {}).items()}


def privacy_results(run: Path) -> dict[str, EraseResult]:
    """The run's privacy erasures (``privacy-<name>.json``), those this kscope reads."""
    out = {}
    for path in sorted(run.glob("privacy-*.json")):
        try:
            out[path.stem[len("privacy-"):]] = EraseResult.load(path)
        except (KscopeError, KeyError, TypeError, ValueError):
            continue  # another kind or an older version: no pages
    return out


def _dp_line(loc) -> str:
    rel = _rel(loc)
    if not rel:
        return "–"
    return "; ".join(f"{op} {k}: {v:+.3f}" for op, by_k in rel.items() for k, v in by_k.items() if k == max(by_k))
