"""Unit sets for a study: neurons at a layer, and SAE features given, cached, or trained (and cached)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rich.progress import Progress

from kscope.config import Config, nested, option, require
from kscope.errors import KscopeError
from kscope.io import check_writable
from kscope.model.loading import ModelConfig, default_cache_dir, model_slug
from kscope.model.sites import Site, check_layer, site_dim
from kscope.units.base import NeuronUnits, Units
from kscope.units.corpus import CorpusConfig, collect_activations
from kscope.io import read_json
from kscope.units.sae import evaluate_sae, feature_units, load_sae, sae_site, save_sae
from kscope.units.training import TrainSAEConfig, train_sae_on_acts


def train_sae(lm, site: Site, tcfg: TrainSAEConfig, texts: Sequence[str], device: str, progress: Progress | None = None):
    """Collect activations, train, and evaluate on a held-out slice. Returns ``(sae, stats_dict)``."""
    import torch

    check_layer(lm.model, site.layer)
    acts = collect_activations(lm, site, texts, tcfg.max_tokens, tcfg.seq_len, progress=progress)
    gen = torch.Generator().manual_seed(tcfg.seed)
    perm = torch.randperm(acts.shape[0], generator=gen)
    n_eval = max(1, int(acts.shape[0] * tcfg.eval_frac))
    ev, tr = acts[perm[:n_eval]], acts[perm[n_eval:]]
    sae = train_sae_on_acts(tr, tcfg, site, lm.name, device)
    stats = evaluate_sae(sae, ev).to_dict()
    stats["n_train_tokens"] = int(tr.shape[0])
    return sae, stats


def cached_sae_dir(model_name: str, site: Site, tcfg: TrainSAEConfig, cache_dir: str | None = None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "saes" / model_slug(model_name) / f"L{site.layer}-{site.kind}-x{tcfg.expansion}-k{tcfg.k}-n{tcfg.max_tokens}-s{tcfg.seed}"

@dataclass
class SAEInfo:
    """Where an SAE came from and how good it is: its directory, how it was obtained, its held-out statistics."""

    site: str
    path: str
    source: str  # "given", "cached" or "trained"
    stats: dict | None = None
    corpus: str | None = None


def _info(site: Site, path: Path | str, source: str) -> SAEInfo:
    meta = Path(path) / "kscope.json"
    extra = read_json(meta) if meta.exists() else {}
    return SAEInfo(site.name, str(path), source, extra.get("stats"), extra.get("corpus"))


def obtain_sae(
    lm,
    site: Site,
    sae_path: str | None,
    tcfg: TrainSAEConfig,
    corpus: Callable[[], list[str]],
    device: str,
    cache_dir: str | None = None,
    progress: Progress | None = None,
):
    """The SAE at ``site`` and its ``SAEInfo``: from ``sae_path``, else from the cache, else trained (and cached)."""
    if sae_path:
        sae = load_sae(sae_path, device)
        return sae, _info(sae_site(sae, site), sae_path, "given")
    cdir = cached_sae_dir(lm.name, site, tcfg, cache_dir)
    if (cdir / "cfg.json").exists():
        return load_sae(str(cdir), device), _info(site, cdir, "cached")
    sae, stats = train_sae(lm, site, tcfg, corpus(), device, progress)
    save_sae(sae, cdir, {"site": site.name, "model": lm.name, "stats": stats})
    return sae, _info(site, cdir, "trained")


def neuron_units(lm, layer: int) -> NeuronUnits:
    site = Site(layer, "mlp.neurons")
    return NeuronUnits(site, site_dim(lm.model, site))


def unit_sets_for_layers(
    lm,
    layers: Sequence[int],
    feature_kind: str,
    sae_paths: Sequence[str] | None,
    tcfg: TrainSAEConfig,
    corpus: Callable[[], list[str]],
    device: str,
    cache_dir: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[tuple[Units, Units]], dict[int, SAEInfo]]:
    """``(neurons, features)`` per layer, and each layer's ``SAEInfo``."""
    if not layers:
        raise KscopeError("no layers given")
    for layer in layers:
        check_layer(lm.model, layer)
    if sae_paths and len(sae_paths) != len(layers):
        raise KscopeError(f"{len(sae_paths)} SAE(s) given for {len(layers)} layer(s); give one per layer")
    out, infos = [], {}
    texts: list[str] | None = None

    def cached_corpus() -> list[str]:
        nonlocal texts
        if texts is None:
            texts = corpus()
        return texts

    for i, layer in enumerate(layers):
        site = Site(layer, feature_kind)
        sae, infos[layer] = obtain_sae(lm, site, sae_paths[i] if sae_paths else None, tcfg, cached_corpus, device, cache_dir, progress)
        feats = feature_units(lm.model, sae, site)
        if feats.site.layer != layer:
            raise KscopeError(f"SAE {sae_paths[i] if sae_paths else ''} is for layer {feats.site.layer}, not {layer}")
        if feats.site.kind != feature_kind:
            raise KscopeError(f"SAE {sae_paths[i] if sae_paths else ''} was trained on {feats.site.name}, not on {site.name}; "
                              f"pass --site {feats.site.kind} or another SAE")
        out.append((neuron_units(lm, layer), feats))
    return out, infos


@dataclass
class TrainSAEJob(Config):
    """Train a TopK SAE (SAELens) on one site and save it in SAELens format, with MSE / explained variance / L0 / dead fraction."""

    model: ModelConfig = nested(ModelConfig)
    site: str = option("12/mlp.out", "LAYER/KIND to train on: mlp.out, resid.post or mlp.neurons (or a SAELens hook name).")
    train: TrainSAEConfig = nested(TrainSAEConfig)
    corpus: CorpusConfig = nested(CorpusConfig)
    facts: str | None = option(None, "Fact prompts to include in the corpus (ParaRel dir or .jsonl; default built-in).")
    out: str | None = option(help="Directory to write the SAE (SAELens format).", required=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        Site.parse(self.site)


def train_sae_job(cfg: TrainSAEJob) -> dict:
    """Train and save; returns the SAE's held-out statistics."""
    from kscope.facts import load_facts
    from kscope.model.loading import load_model
    from kscope.progress import make_progress
    from kscope.units.corpus import sae_corpus

    s = Site.parse(cfg.site)
    out = Path(require(cfg.out, "--out"))
    if out.exists() and not (out / "cfg.json").exists() and (not out.is_dir() or any(out.iterdir())):
        raise KscopeError(f"--out {out} exists and is not an SAE directory; refusing to overwrite")
    check_writable(out, inputs=[cfg.facts], directory=True)
    fact_list = load_facts(cfg.facts)
    lm = load_model(cfg.model)
    check_layer(lm.model, s.layer)
    with make_progress() as progress:
        texts = sae_corpus(lm, fact_list, cfg.train, cfg.corpus, progress)
        sae, stats = train_sae(lm, s, cfg.train, texts, cfg.model.device, progress)
    save_sae(sae, out, {"site": s.name, "model": cfg.model.model, "stats": stats})
    return stats
