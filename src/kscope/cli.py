"""``kscope`` command line. Option help comes from the config dataclasses' field docs."""

from __future__ import annotations

import functools
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from kscope.errors import KscopeError
from kscope.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kscope, the Knowledge Microscope: neurons vs SAE features for facts in LMs.")


def H(cls, name: str) -> str:
    """Help text of a config field."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def parse_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (blanks dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _table(title: str, headers: list[str], rows: list[list]):
    """A rich table of ``rows`` (cells printed with ``str``), columns right-aligned."""
    from rich.table import Table

    t = Table(title=title)
    for h in headers:
        t.add_column(h, justify="right")
    for r in rows:
        t.add_row(*map(str, r))
    return t


def parse_layers(text: str) -> list[int]:
    """``"12"``, ``"10,12,14"`` or ``"10-14"``."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise KscopeError(f"cannot parse layers {text!r}; use 12, 10,12 or 10-14") from None
    if not out:
        raise KscopeError("no layers given")
    return out


def friendly(fn):
    """Print KscopeError as a one-line error and exit 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KscopeError as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper


def _configs():
    from kscope.attribution import AttributionConfig
    from kscope.facts import FactConfig
    from kscope.influence import InfluenceConfig
    from kscope.models import ModelConfig
    from kscope.sae import TrainSAEConfig
    from kscope.study import StudyConfig

    return ModelConfig, FactConfig, AttributionConfig, InfluenceConfig, TrainSAEConfig, StudyConfig


M, F, A, I, T, S = _configs()

# Options shared by several commands.
ModelOpt = typer.Option("smollm2", "--model", help=H(M, "model"))
DeviceOpt = typer.Option("cpu", "--device", help=H(M, "device"))
DtypeOpt = typer.Option("float32", "--dtype", help=H(M, "dtype"))
FactsOpt = typer.Option(None, "--facts", help=H(F, "facts"))
RelOpt = typer.Option(None, "--relation-ids", help="Comma-separated ParaRel relation ids to keep (e.g. P36,P103).")
MaxFactsOpt = typer.Option(None, "--max-facts", help=H(F, "max_facts"))
PerRelOpt = typer.Option(50, "--max-per-relation", help=H(F, "max_per_relation"))
TopKKnownOpt = typer.Option(1, "--known-top-k", help=H(F, "known_top_k"))
MinKnownOpt = typer.Option(2, "--min-known-prompts", help=H(F, "min_known_prompts"))
MultiOpt = typer.Option("first", "--multi-token", help=H(F, "multi_token"))
LayersOpt = typer.Option("12", "--layers", help="Layers: 12, 10,12 or 10-14. " + H(S, "layers"))
SiteOpt = typer.Option("mlp.out", "--site", help=H(S, "feature_site"))
SaeOpt = typer.Option(None, "--sae", help=H(S, "saes"))
StepsOpt = typer.Option(20, "--steps", help=H(A, "steps"))
BatchOpt = typer.Option(1024, "--batch-size", help=H(A, "batch_size"))
TopKOpt = typer.Option(10, "--top-k", help=H(A, "top_k"))
SeedOpt = typer.Option(0, "--seed", help=H(F, "seed"))


def _study_cfg(model, device, dtype, facts, relation_ids, max_facts, max_per_relation, known_top_k, min_known_prompts,
               multi_token, layers, site, sae, steps, batch_size, top_k, seed, out, ks=None, positions="last"):
    sc = S(
        model=M(model=model, device=device, dtype=dtype),
        facts=F(facts=facts, relations=relation_ids.split(",") if relation_ids else None, max_facts=max_facts,
                max_per_relation=max_per_relation, known_top_k=known_top_k, min_known_prompts=min_known_prompts,
                multi_token=multi_token, seed=seed),
        layers=parse_layers(layers),
        feature_site=site,
        saes=list(sae or []),
        attribution=A(steps=steps, batch_size=batch_size, top_k=top_k),
        influence=I(ks=ks or [1, 5, 10], positions=positions),
        out=out,
    )
    return sc


@app.command()
@friendly
def compare(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    facts: Optional[str] = FactsOpt,
    relation_ids: Optional[str] = RelOpt,
    max_facts: Optional[int] = typer.Option(60, "--max-facts", help=H(F, "max_facts")),
    max_per_relation: int = PerRelOpt,
    known_top_k: int = TopKKnownOpt,
    min_known_prompts: int = MinKnownOpt,
    multi_token: str = MultiOpt,
    layers: str = LayersOpt,
    site: str = SiteOpt,
    sae: Optional[list[str]] = SaeOpt,
    steps: int = StepsOpt,
    batch_size: int = BatchOpt,
    top_k: int = TopKOpt,
    ks: str = typer.Option("1,5,10", "--ks", help=H(I, "ks")),
    positions: str = typer.Option("last", "--positions", help=H(I, "positions")),
    seed: int = SeedOpt,
    out: str = typer.Option("runs/compare.json", "--out", help=H(S, "out")),
):
    """Neurons vs SAE features: locate each known fact with IG, then ΔProb of suppressing/enhancing the top-k units."""
    from kscope.study import print_summary, run_study

    cfg = _study_cfg(model, device, dtype, facts, relation_ids, max_facts, max_per_relation, known_top_k, min_known_prompts,
                     multi_token, layers, site, sae, steps, batch_size, top_k, seed, out, parse_layers(ks), positions)
    result = run_study(cfg, measure=True)
    print_summary(result)
    console.print(f"wrote {out} ({result['n_facts']} facts, {result['seconds']:.0f} s)")


@app.command()
@friendly
def locate(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    facts: Optional[str] = FactsOpt,
    subject: Optional[str] = typer.Option(None, "--subject", help="A single fact: its subject."),
    relation: str = typer.Option("fact", "--relation", help="A single fact: its relation name."),
    obj: Optional[str] = typer.Option(None, "--object", help="A single fact: its object (the answer)."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="A single fact: a prompt ending before the object (repeat for paraphrases)."),
    relation_ids: Optional[str] = RelOpt,
    max_facts: Optional[int] = MaxFactsOpt,
    max_per_relation: int = PerRelOpt,
    known_top_k: int = TopKKnownOpt,
    min_known_prompts: int = MinKnownOpt,
    multi_token: str = MultiOpt,
    layers: str = LayersOpt,
    site: str = SiteOpt,
    sae: Optional[list[str]] = SaeOpt,
    features: bool = typer.Option(True, "--features/--no-features", help=H(S, "features")),
    steps: int = StepsOpt,
    batch_size: int = BatchOpt,
    top_k: int = TopKOpt,
    seed: int = SeedOpt,
    out: str = typer.Option("runs/locate.json", "--out", help=H(S, "out")),
):
    """Top neurons and top SAE features of a fact (or a fact file) with their IG scores, as JSON."""
    from rich.table import Table

    from kscope.facts import Fact, resolve_targets
    from kscope.models import load_model
    from kscope.study import run_study

    cfg = _study_cfg(model, device, dtype, facts, relation_ids, max_facts, max_per_relation, known_top_k, min_known_prompts,
                     multi_token, layers, site, sae, steps, batch_size, top_k, seed, out)
    cfg.features = features
    given = None
    if subject or obj or prompt:
        if not (subject and obj and prompt):
            raise KscopeError("a single fact needs --subject, --object and at least one --prompt")
        if facts:
            raise KscopeError("give either --facts or a single fact (--subject/--object/--prompt), not both")
        cfg.validate()
        lm = load_model(cfg.model)
        given = resolve_targets([Fact(subject, relation, obj, list(prompt))], lm.tokenizer, "error" if multi_token == "first" else multi_token)
        if not given:
            raise KscopeError(f"target {obj!r} is not one token")
        result = run_study(cfg, measure=False, facts=given, lm=lm)
    else:
        result = run_study(cfg, measure=False)
    for row in result["facts"][:5]:
        t = Table(title=f"{row['subject']} -> {row['object']}")
        for c in ("layer", "units", "top (unit:score)"):
            t.add_column(c)
        for L, entry in row["layers"].items():
            for kind, e in entry.items():
                t.add_row(L, kind, "  ".join(f"{u['unit']}:{u['score']:.3g}" for u in e["top"][:5]))
        console.print(t)
    console.print(f"wrote {out} ({result['n_facts']} facts)")


@app.command("train-sae")
@friendly
def train_sae_cmd(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    site: str = typer.Option("12/mlp.out", "--site", help=H(T, "site")),
    out: str = typer.Option(..., "--out", help="Directory to write the SAE (SAELens format)."),
    facts: Optional[str] = typer.Option(None, "--facts", help="Fact prompts to include in the corpus (ParaRel dir or .jsonl; default built-in)."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="Plain-text files for the corpus."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="HF dataset name/path for the corpus (needs it reachable)."),
    expansion: int = typer.Option(8, "--expansion", help=H(T, "expansion")),
    k: int = typer.Option(32, "--k", help=H(T, "k")),
    max_tokens: int = typer.Option(60_000, "--max-tokens", help=H(T, "max_tokens")),
    generate: int = typer.Option(256, "--generate", help=H(T, "generate")),
    epochs: int = typer.Option(8, "--epochs", help=H(T, "epochs")),
    lr: float = typer.Option(4e-4, "--lr", help=H(T, "lr")),
    seed: int = typer.Option(0, "--seed", help=H(T, "seed")),
):
    """Train a TopK SAE (SAELens) on one site and save it in SAELens format, with MSE / explained variance / L0 / dead fraction."""
    from kscope.facts import load_facts
    from kscope.models import load_model
    from kscope.pipeline import CorpusConfig, sae_corpus, train_sae
    from kscope.progress import make_progress
    from kscope.sae import save_sae
    from kscope.sites import Site, check_layer

    tcfg = T(site=site, expansion=expansion, k=k, max_tokens=max_tokens, generate=generate, epochs=epochs, lr=lr, seed=seed)
    s = Site.parse(site)
    if Path(out).exists() and not (Path(out) / "cfg.json").exists() and any(Path(out).iterdir()):
        raise KscopeError(f"--out {out} exists and is not an SAE directory; refusing to overwrite")
    fact_list = load_facts(facts)
    lm = load_model(M(model=model, device=device, dtype=dtype))
    check_layer(lm.model, s.layer)
    with make_progress() as progress:
        texts = sae_corpus(lm, fact_list, tcfg, CorpusConfig(text_files=list(text or []), dataset=dataset), progress)
        sae, stats = train_sae(lm, s, tcfg, texts, device, progress)
    save_sae(sae, out, {"site": s.name, "model": model, "stats": stats})
    console.print({k_: round(v, 4) if isinstance(v, float) else v for k_, v in stats.items()})
    console.print(f"wrote SAE to {out}")


def _analysis_cfg(model, device, facts, max_facts, max_per_relation, layer, site, sae, located, out_dir, seed,
                  known_top_k=1, min_known_prompts=2):
    from kscope.analyses import AnalysisConfig

    return AnalysisConfig(
        model=M(model=model, device=device),
        facts=F(facts=facts, max_facts=max_facts, max_per_relation=max_per_relation, seed=seed,
                known_top_k=known_top_k, min_known_prompts=min_known_prompts),
        layer=layer, feature_site=site, sae=sae, located=located, out_dir=out_dir,
    )


LayerOpt = typer.Option(12, "--layer", help="Layer to analyse.")
OneSaeOpt = typer.Option(None, "--sae", help="SAELens SAE directory; default: train (and cache) one.")
LocatedOpt = typer.Option(None, "--located", help="Reuse top units from a compare/locate JSON.")
OutDirOpt = typer.Option("runs", "--out-dir", help="Directory for JSON and PNG outputs.")
AFactsMax = typer.Option(60, "--max-facts", help=H(F, "max_facts"))


@app.command()
@friendly
def faithfulness(
    model: str = ModelOpt, device: str = DeviceOpt, facts: Optional[str] = FactsOpt, max_facts: Optional[int] = AFactsMax,
    max_per_relation: int = PerRelOpt, layer: int = LayerOpt, site: str = SiteOpt, sae: Optional[str] = OneSaeOpt,
    fit_tokens: int = typer.Option(20_000, "--fit-tokens", help="Activation tokens to fit PCA/ICA on."),
    ks: str = typer.Option("1,5,10", "--ks", help="Top-k units ablated per fact."),
    known_top_k: int = TopKKnownOpt, min_known_prompts: int = MinKnownOpt, out_dir: str = OutDirOpt, seed: int = SeedOpt,
):
    """SAE vs PCA vs ICA vs random directions: reconstruction, knowledge preservation, top-k ablation ΔProb."""
    from kscope.analyses import run_faithfulness_job
    from kscope.faithfulness import FaithfulnessConfig

    cfg = _analysis_cfg(model, device, facts, max_facts, max_per_relation, layer, site, sae, None, out_dir, seed, known_top_k, min_known_prompts)
    res = run_faithfulness_job(cfg, FaithfulnessConfig(fit_tokens=fit_tokens, ks=parse_layers(ks)))
    from kscope.report import faithfulness_rows

    console.print(_table(f"Decompositions of {res['site']} ({res['n_facts']} facts)",
                         ["decomposition", "units", "L0", "expl. var.", "P recon/clean", "top-1 kept", "ΔProb top-k ablated"],
                         faithfulness_rows(res)))
    console.print(f"wrote {out_dir}/faithfulness.json and faithfulness.png")


@app.command()
@friendly
def interpret(
    model: str = ModelOpt, device: str = DeviceOpt, facts: Optional[str] = FactsOpt, max_facts: Optional[int] = AFactsMax,
    max_per_relation: int = PerRelOpt, layer: int = LayerOpt, site: str = SiteOpt, sae: Optional[str] = OneSaeOpt,
    located: Optional[str] = LocatedOpt, per_fact: int = typer.Option(1, "--per-fact", help="Top units per fact to score."),
    n_contexts: int = typer.Option(600, "--contexts", help="Text windows scanned."),
    llm_url: Optional[str] = typer.Option(None, "--llm-url", help="OpenAI-compatible base URL for an LLM explainer/simulator."),
    llm_model: str = typer.Option("gpt-4o-mini", "--llm-model", help="Model name for --llm-url."),
    known_top_k: int = TopKKnownOpt, min_known_prompts: int = MinKnownOpt, out_dir: str = OutDirOpt, seed: int = SeedOpt,
):
    """Interpretability score of the top fact neurons vs top fact features (offline token proxy, or an LLM)."""
    from kscope.analyses import run_interpret_job
    from kscope.interpret import InterpretConfig

    cfg = _analysis_cfg(model, device, facts, max_facts, max_per_relation, layer, site, sae, located, out_dir, seed, known_top_k, min_known_prompts)
    res = run_interpret_job(cfg, InterpretConfig(n_contexts=n_contexts, llm_url=llm_url, llm_model=llm_model, seed=seed), per_fact)
    for kind, r in res["results"].items():
        s_ = r["summary"]
        console.print(f"{kind}s: IS mean {s_['mean']:.3f} [{s_['lo'] if s_['lo'] is not None else float('nan'):.3f}, "
                      f"{s_['hi'] if s_['hi'] is not None else float('nan'):.3f}] over {s_['n']} units ({r['explainer']})")
    console.print(f"wrote {out_dir}/interpret.json and interpret.png")


@app.command()
@friendly
def monosemanticity(
    model: str = ModelOpt, device: str = DeviceOpt, facts: Optional[str] = FactsOpt, max_facts: Optional[int] = AFactsMax,
    max_per_relation: int = PerRelOpt, layer: int = LayerOpt, site: str = SiteOpt, sae: Optional[str] = OneSaeOpt,
    located: Optional[str] = LocatedOpt, top_units: int = typer.Option(3, "--top-units", help="Top units per fact to test."),
    known_top_k: int = TopKKnownOpt, min_known_prompts: int = MinKnownOpt, out_dir: str = OutDirOpt, seed: int = SeedOpt,
):
    """Related vs unrelated activation of each fact's top units: Cohen's d, AUROC, Mann-Whitney p, mixed pools."""
    from kscope.analyses import run_monosemanticity_job
    from kscope.monosemanticity import MonosemanticityConfig

    cfg = _analysis_cfg(model, device, facts, max_facts, max_per_relation, layer, site, sae, located, out_dir, seed, known_top_k, min_known_prompts)
    res = run_monosemanticity_job(cfg, MonosemanticityConfig(top_units=top_units, seed=seed))
    for kind, r in res["results"].items():
        s_ = r["summary"]
        console.print(f"{kind}s: AUROC {s_['auroc']['mean']:.3f}, median Cohen's d {s_['cohens_d_median']:.2f}, "
                      f"significant {100 * s_['frac_significant']:.0f}% of {s_['n_units']} units")
    console.print(f"wrote {out_dir}/monosemanticity.json and monosemanticity.png")


privacy_app = typer.Typer(no_args_is_help=True, help="PrivacyParaRel: inject private facts, then erase them with FeatureEdit / DEPN / KN erase.")
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("build")
@friendly
def privacy_build(
    out: str = typer.Option(..., "--out", help="New directory for the fine-tuned model (never an existing one)."),
    model: str = ModelOpt, device: str = DeviceOpt,
    people: int = typer.Option(10, "--people", help="Fictitious people (5 attributes each)."),
    attributes: str = typer.Option("phone,email,city,employer,birthdate", "--attributes", help="Comma-separated attributes."),
    epochs: int = typer.Option(12, "--epochs", help="Fine-tuning epochs."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed for people, secrets and training order."),
):
    """Make PrivacyParaRel, inject it by a short fine-tune, save the model + manifest to a new directory."""
    from kscope.privacy import build
    from kscope.privacy_data import PrivacyConfig

    cfg = PrivacyConfig(n_people=people, attributes=parse_list(attributes),
                        epochs=epochs, lr=lr, seed=seed)
    m = build(M(model=model, device=device), cfg, out)
    s_ = m["summary"]
    console.print(f"memorised {s_['memorised_exact']}/{s_['n_facts']} private facts exactly "
                  f"({s_['memorised_top1']} by first-token top-1); final loss {s_['losses'][-1]:.3f}; wrote {out}")


@privacy_app.command("erase")
@friendly
def privacy_erase(
    model_dir: str = typer.Option(..., "--model-dir", help="A directory made by `kscope privacy build`."),
    methods: str = typer.Option("feature-edit,depn,kn-erase,runtime-feature", "--method", help="Comma-separated editors."),
    layer: int = typer.Option(12, "--layer", help="Layer to edit."),
    sae: Optional[str] = typer.Option(None, "--sae", help="SAE directory (default: the base model's cached SAE)."),
    neurons: int = typer.Option(20, "--neurons", help="Budget in neurons (weights = neurons x d_model for all weight editors)."),
    features: int = typer.Option(10, "--features", help="Features located for FeatureEdit."),
    n_erase: Optional[int] = typer.Option(None, "--n-erase", help="Private facts to erase (default half)."),
    unrelated: Optional[str] = typer.Option(None, "--unrelated", help="ParaRel dir / fact file for locality (default built-in)."),
    steps: int = typer.Option(10, "--steps", help="IG steps."),
    device: str = DeviceOpt,
    out: str = typer.Option("runs/privacy.json", "--out", help="JSON results."),
):
    """Locate privacy neurons/features and compare erasure editors: Rel, Gen, Loc, ΔPPL, exposure at matched budgets."""
    from kscope.privacy import EraseConfig, erase
    from kscope.report import privacy_rows

    cfg = EraseConfig(methods=parse_list(methods), layer=layer, sae=sae, n_erase=n_erase,
                      neurons=neurons, features=features, steps=steps, unrelated=unrelated)
    res = erase(model_dir, cfg, out, device)
    console.print(_table(f"Erasing {res['n_erased']} private facts at layer {layer} (weight budget {res['weight_budget']})",
                         ["method", "units", "weights", "Rel ↑", "Gen ↑", "Loc ↑", "ΔPPL ↓", "exposure ↓"], privacy_rows(res)))
    console.print(f"wrote {out}")


@app.command()
@friendly
def reproduce(
    model: str = ModelOpt, device: str = DeviceOpt,
    facts: Optional[str] = typer.Option(None, "--facts", help="ParaRel dir or fact file; default: the built-in facts."),
    max_facts: int = typer.Option(60, "--max-facts", help="Known facts to study."),
    layer: int = typer.Option(12, "--layer", help="Layer of the neurons and the SAE."),
    out: str = typer.Option("report", "--out", help="Report directory (index.html, results.json, figures)."),
    stages: str = typer.Option(",".join(("compare", "faithfulness", "interpret", "monosemanticity", "privacy-build", "privacy-erase")),
                               "--stages", help="Comma-separated stages to run."),
    fresh: bool = typer.Option(False, "--fresh", help="Redo stages whose results already exist (default: resume)."),
    people: int = typer.Option(10, "--people", help="Fictitious people for the privacy stages."),
    known_top_k: int = TopKKnownOpt, min_known_prompts: int = MinKnownOpt,
    sae_tokens: int = typer.Option(60_000, "--sae-tokens", help=H(T, "max_tokens")),
    sae_generate: int = typer.Option(256, "--sae-generate", help=H(T, "generate")),
):
    """The whole study: ΔProb, faithfulness, interpretability, monosemanticity, privacy erasure -> report/index.html."""
    from kscope.reproduce import ReproduceConfig, run_reproduce

    cfg = ReproduceConfig(model=M(model=model, device=device), facts=facts, max_facts=max_facts, layer=layer, out=out,
                          stages=parse_list(stages), fresh=fresh, people=people,
                          known_top_k=known_top_k, min_known_prompts=min_known_prompts,
                          sae_train=T(max_tokens=sae_tokens, generate=sae_generate))
    run_reproduce(cfg)
    console.print(f"wrote {out}/index.html and {out}/results.json")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
