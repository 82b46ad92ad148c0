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
BatchOpt = typer.Option(20, "--batch-size", help=H(A, "batch_size"))
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
