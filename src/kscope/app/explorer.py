"""A static explorer of a run (opens from disk, no server): per fact, its top neurons and features by layer with
IG scores and ΔProb bars; per unit, its top-activating contexts with tokens shaded by activation, its
activation histogram and its interpretability explanation; links both ways; the study's figures.

``sae-dashboard`` needs a TransformerLens model, which a GGUF/HF-only model is not, so this is a small template.
Every page checks itself after loading (images decoded, tables filled, no script error) and writes the
verdict to ``<body data-check>``, which the browser test reads.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from kscope.analyses.autointerp import InterpretConfig, InterpretResult, record_many
from kscope.config import Config, nested, option
from kscope.errors import KscopeError
from kscope.io import check_writable, write_text
from kscope.locate.compare import CompareResult
from kscope.model.loading import ModelConfig, load_model, same_model
from kscope.model.sites import Site
from kscope.pages import CHECK, STYLE
from kscope.progress import make_progress
from kscope.units.corpus import CorpusConfig, build_corpus
from kscope.units.provision import neuron_units
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


def page(title: str, body: str, depth: int = 0) -> str:
    up = "../" * depth
    nav = f'<p class="muted"><a href="{up}index.html">explorer</a> · <a href="{up}../index.html">report</a></p>'
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>{CHECK}"
            f"</head><body>{nav}<h1>{html.escape(title)}</h1>{body}</body></html>")


def shade(tokens: list[str], acts: list[float], peak: float) -> str:
    """Tokens as spans whose background deepens with the activation (orange: positive, blue: negative)."""
    out = []
    for tok, a in zip(tokens, acts):
        alpha = min(1.0, abs(a) / peak) if peak > 0 else 0.0
        color = f"rgba(230,85,13,{alpha:.2f})" if a >= 0 else f"rgba(49,130,189,{alpha:.2f})"
        out.append(f'<span style="background:{color}" title="{a:.3g}">{html.escape(tok)}</span>')
    return "".join(out)


def histogram(values: torch.Tensor, bins: int = 30, width: int = 420, height: int = 90) -> str:
    """An inline SVG histogram of the non-zero activations."""
    v = values[values != 0].float()
    if v.numel() == 0:
        return '<p class="muted">never active on these contexts</p>'
    counts = torch.histc(v, bins=bins, min=float(v.min()), max=float(v.max()) + 1e-6)
    top = float(counts.max())
    w = width / bins
    rects = "".join(f'<rect x="{i * w:.1f}" y="{height - height * float(c) / top:.1f}" width="{w - 1:.1f}" '
                    f'height="{height * float(c) / top:.1f}" fill="#3182bd"/>' for i, c in enumerate(counts))
    return (f'<svg width="{width}" height="{height + 16}" role="img"><title>activation histogram</title>{rects}'
            f'<text x="0" y="{height + 13}" font-size="10">{float(v.min()):.3g}</text>'
            f'<text x="{width - 40}" y="{height + 13}" font-size="10">{float(v.max()):.3g}</text></svg>'
            f'<p class="muted">{v.numel()} of {values.numel()} token activations are non-zero</p>')


def bars(delta: dict | None) -> str:
    """ΔProb per op and k as a small table of signed bars."""
    if not delta:
        return '<span class="muted">–</span>'
    rows = []
    for op, by_k in delta.items():
        for k, v in by_k.items():
            w = min(100, abs(v) * 100)
            color = "#e6550d" if v < 0 else "#31a354"
            rows.append(f"<tr><td>{op} top-{k}</td><td style='text-align:left'><span class='bar' style='width:{w:.0f}px;background:{color}'>"
                        f"</span> {v:+.3f}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _rel(loc) -> dict | None:
    """Relative ΔP of the top-k edits, per op and k."""
    return {op: {k: e.rel for k, e in by_k.items()} for op, by_k in loc.effects.top.items()} if loc.effects else None


def unit_file(layer: int, kind: str, unit: int) -> str:
    return f"units/L{layer}-{kind}-{unit}.html"


def _unit_link(layer: int, kind: str, unit: int, made: set) -> str:
    return f'<a href="{unit_file(layer, kind, unit)}">{unit}</a>' if (layer, kind, unit) in made else str(unit)


def build_explorer(cfg: ExploreConfig) -> Path:
    """Write ``<run_dir>/explorer/`` and return its index page."""
    run = Path(cfg.run_dir or "")
    if not (run / "compare.json").exists():
        raise KscopeError(f"{run} holds no compare.json; run `kscope reproduce` or `kscope compare --out {run}/compare.json` first")
    res = CompareResult.load(run / "compare.json")
    if not res.facts:
        raise KscopeError(f"{run}/compare.json holds no per-fact results")
    model, corpus = run_inputs(cfg, res)
    inputs = [*model.reads(), *corpus.reads(), *(info.path for info in res.saes.values()), run / "compare.json", run / "interpret.json"]
    check_writable(run / "explorer", inputs, directory=True, writes=["."], flag="--run-dir")
    interp = InterpretResult.load(run / "interpret.json") if (run / "interpret.json").exists() else None
    explained = {}
    if interp:
        for kind, r in interp.results.items():
            for u in r.rows:
                explained[(interp.layer, kind, u.unit)] = u
    out = run / "explorer"
    lm = load_model(model)
    wanted: dict[tuple[int, str], list[int]] = {}
    for f in res.facts:
        for L, entry in f.layers.items():
            for kind, loc in entry.items():
                lst = wanted.setdefault((L, kind), [])
                lst.extend(u.unit for u in loc.top[: cfg.units_per_fact] if u.unit not in lst)
    picks = []
    for (L, kind), idx in wanted.items():
        if kind == "neuron":
            units = neuron_units(lm, L)
        elif kind == "feature":
            info = res.saes.get(L)
            if info is None:
                continue
            units = feature_units(lm.model, load_sae(info.path, model.device), Site.parse(info.site))
        else:  # same-site baselines have no unit pages
            continue
        picks.append(((L, kind), units, idx))
    with make_progress() as progress:
        _, texts = build_corpus(lm, corpus, progress, model.cache_dir).split()
        records = record_many(lm, [(u, idx) for _, u, idx in picks], texts, cfg.interpret, progress)
    facts_of: dict[tuple[int, str, int], list[int]] = {}
    for i, f in enumerate(res.facts):
        for L, entry in f.layers.items():
            for kind, loc in entry.items():
                for u in loc.top[: cfg.units_per_fact]:
                    facts_of.setdefault((L, kind, u.unit), []).append(i)
    for ((L, kind), _, idx), rec in zip(picks, records):
        for c, unit in enumerate(idx):
            a = rec.acts[..., c]
            peak = float(a.abs().max())
            order = torch.argsort(a.abs().amax(1), descending=True)[: cfg.contexts].tolist()
            ctxs = "".join(f'<div class="ctx">{shade(rec.tokens[w], a[w, : len(rec.tokens[w])].tolist(), peak)}</div>' for w in order)
            e = explained.get((L, kind, unit))
            expl = (f"<p>explanation: <b>{html.escape(str(e.explanation))}</b>; interpretability score {e.score:.2f}</p>"
                    if e else '<p class="muted">no interpretability score for this unit in this run</p>')
            links = "".join(f'<li><a href="../fact-{i}.html">{html.escape(res.facts[i].subject)} → {html.escape(res.facts[i].object)}</a></li>'
                            for i in facts_of.get((L, kind, unit), []))
            body = (f"<p>{kind} {unit} at layer {L}</p>{expl}<h2>Top-activating contexts</h2>{ctxs}<h2>Activations</h2>"
                    f"{histogram(a)}<h2>Top unit of</h2><ul>{links}</ul>")
            write_text(out / unit_file(L, kind, unit), page(f"{kind} {unit}, layer {L}", body, depth=1))
    made = {(L, kind, u) for (L, kind), _, idx in picks for u in idx}
    for i, f in enumerate(res.facts):
        parts = [f"<p>{html.escape(f.relation)}: <b>{html.escape(f.subject)}</b> → <b>{html.escape(f.object)}</b> "
                 f"(scored token {html.escape(repr(f.target_token))})</p><ul>"
                 + "".join(f"<li>{html.escape(p)}</li>" for p in f.prompts) + "</ul>"]
        for L, entry in f.layers.items():
            parts.append(f"<h2>Layer {L}</h2>")
            for kind, loc in entry.items():
                rows = "".join(f"<tr><td>{_unit_link(L, kind, u.unit, made)}</td><td>{u.score:.3g}</td><td>{u.freq:.2f}</td></tr>"
                               for u in loc.top)
                parts.append(f"<h3>{kind}s</h3><table><tr><th>unit</th><th>IG score</th><th>selected on</th></tr>{rows}</table>"
                             f"<p>ΔP(answer) when its top units are edited:</p>{bars(_rel(loc))}")
        write_text(out / f"fact-{i}.html", page(f"{f.subject} → {f.object}", "".join(parts)))
    figs = "".join(f'<h2>{p.stem}</h2><img src="../{p.name}" alt="{p.stem}">' for p in sorted(run.glob("*.png")))
    rows = "".join(f"<tr><td><a href='fact-{i}.html'>{html.escape(f.subject)}</a></td><td>{html.escape(f.relation)}</td>"
                   f"<td>{html.escape(f.object)}</td><td>{len(f.prompts)}</td></tr>" for i, f in enumerate(res.facts))
    body = (f"<p>{res.n_facts} facts, model {html.escape(res.model)}; {len(made)} unit pages.</p>"
            f"<table><tr><th>subject</th><th>relation</th><th>object</th><th>prompts</th></tr>{rows}</table>{figs}")
    return write_text(out / "index.html", page("kscope explorer", body))
