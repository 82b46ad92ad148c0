"""Unit sets for a study: neurons at a layer, and SAE features given, cached, or trained (and cached).

SAEs for many sites are trained together from one activation pass (``obtain_saes``). A cached SAE
lives under a key that covers everything that shapes it: the model's weights (fingerprint), the
site, the training options and the corpus (content hash and held-out rule). Each records in
``kscope.json`` its statistics on held-out texts it never saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import Progress

from kscope.config import MAX_TOKENS, Config, nested, option, parse_layers
from kscope.errors import KscopeError
from kscope.io import read_json
from kscope.model.loading import ModelConfig, default_cache_dir, model_slug
from kscope.model.sites import Site, check_layer, down_proj_weight, site_dim
from kscope.units.base import FeatureUnits, NeuronUnits, Units
from kscope.units.corpus import Corpus, CorpusConfig, build_corpus, collect_activations
from kscope.units.decompositions import BASELINES, baseline_units
from kscope.units.sae import evaluate_sae, feature_units, load_sae, save_sae
from kscope.numerics import fixed_threads, numerics_info, tensor_hash
from kscope.units.training import TRAINING_VERSION, TrainSAEConfig, check_width, drop_outliers, train_saes


@dataclass
class SAEInfo:
    """Where an SAE came from and how good it is: its directory, how it was obtained, its held-out statistics."""

    site: str
    path: str
    source: str  # "given", "cached" or "trained"
    stats: dict | None = None
    corpus: dict | None = None
    key: str | None = None
    weights: str | None = None  # hash of the SAE's weights (kscope.numerics.tensor_hash): tells two SAEs of one key apart

    def summary(self) -> str:
        s = self.stats or {}
        if not s:
            return f"{self.site}: {self.path} (no statistics recorded)"
        return (f"{self.site}: {s.get('n_train_tokens', '?')} training tokens, held-out explained variance "
                f"{s.get('explained_variance', float('nan')):.3f}, L0 {s.get('l0', float('nan')):.1f}, "
                f"dead {100 * s.get('dead_fraction', float('nan')):.1f} %")


def sae_key(fingerprint: str, site: Site, tcfg: TrainSAEConfig, corpus: Corpus, seq_len: int) -> str:
    """Hash of everything that shapes a trained SAE, the version of the training code included."""
    text = json.dumps({"model": fingerprint, "site": site.name, "arch": "topk", "train": asdict(tcfg),
                       "corpus": corpus.identity, "seq_len": seq_len, "code": TRAINING_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_sae_dir(lm, site: Site, tcfg: TrainSAEConfig, key: str, cache_dir: str | None = None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "saes" / f"{model_slug(lm.name)}-{lm.fingerprint}" / f"L{site.layer}-{site.kind}-x{tcfg.expansion}-k{tcfg.k}-{key}"


def weights_hash(sae) -> str:
    return tensor_hash(sae.state_dict())


def _info(site: Site, path: Path | str, source: str, sae=None) -> SAEInfo:
    meta = Path(path) / "kscope.json"
    extra = read_json(meta) if meta.exists() else {}
    return SAEInfo(site.name, str(path), source, extra.get("stats"), extra.get("corpus"), extra.get("key"),
                   weights_hash(sae) if sae is not None else extra.get("weights"))


def _cached(path: Path, device: str):
    """The SAE cached at ``path`` if its weights hash to what its ``kscope.json`` promises, else None (with a note)."""
    from kscope.progress import note

    if not ((path / "cfg.json").exists() and (path / "kscope.json").exists()):
        return None
    try:
        sae = load_sae(str(path), device)
    except KscopeError as e:
        note(f"cached SAE {path.name} is broken ({e}): training it again")
        return None
    want = read_json(path / "kscope.json").get("weights")
    if want != weights_hash(sae):
        note(f"cached SAE {path.name} does not hash to what its key promises ({want or 'no hash recorded'}): training it again")
        return None
    return sae


def _load_given(lm, path: str, site: Site, device: str):
    sae = load_sae(path, device)
    feats = feature_units(lm.model, sae, site)
    if feats.site != site:
        raise KscopeError(f"SAE {path} was trained on {feats.site.name}, not on {site.name}; pass --site {feats.site.kind} "
                          f"and its layer, or another SAE")
    return sae, _info(site, path, "given", sae)


def obtain_saes(
    lm,
    sites: Sequence[Site],
    tcfg: TrainSAEConfig,
    ccfg: CorpusConfig,
    device: str = "cpu",
    cache_dir: str | None = None,
    progress: Progress | None = None,
    given: dict[Site, str] | None = None,
    out_dirs: dict[Site, Path] | None = None,
) -> dict[Site, tuple[object, SAEInfo]]:
    """An SAE per site: given (a directory), cached, or trained. All missing SAEs are trained together
    from one activation pass over the corpus's training texts and evaluated on its held-out texts.
    ``out_dirs`` saves trained SAEs there instead of in the cache."""
    sites = list(dict.fromkeys(sites))
    given = given or {}
    for s in sites:
        check_layer(lm.model, s.layer)
        if s not in given:  # only SAEs kscope trains need a k that fits
            check_width(tcfg, site_dim(lm.model, s))
    out: dict[Site, tuple[object, SAEInfo]] = {s: _load_given(lm, given[s], s, device) for s in sites if s in given}
    todo = [s for s in sites if s not in out]
    if not todo:
        return out
    corpus = build_corpus(lm, ccfg, progress, cache_dir)
    keys = {s: sae_key(lm.fingerprint, s, tcfg, corpus, ccfg.seq_len) for s in todo}
    dirs = {s: (out_dirs or {}).get(s) or cached_sae_dir(lm, s, tcfg, keys[s], cache_dir) for s in todo}
    missing = []
    for s in todo:
        sae = _cached(dirs[s], device) if out_dirs is None else None
        if sae is not None:
            out[s] = (sae, _info(s, dirs[s], "cached", sae))
        else:
            missing.append(s)
    if missing:
        train_texts, held_texts = corpus.split()
        # bfloat16 halves the memory of many sites x 300k tokens; one dtype whatever the number of sites, so an SAE
        # does not depend on which others are trained beside it
        acts = collect_activations(lm, missing, train_texts, tcfg.max_tokens, ccfg.seq_len, progress=progress, dtype=torch.bfloat16)
        n_held = max(2048, int(tcfg.max_tokens * ccfg.heldout_frac / (1 - ccfg.heldout_frac)))
        held = collect_activations(lm, missing, held_texts, n_held, ccfg.seq_len, progress=progress)
        dropped = {}
        for s in missing:
            (acts[s], n_train), (held[s], n_held) = drop_outliers(acts[s], tcfg.outlier_factor), drop_outliers(held[s], tcfg.outlier_factor)
            dropped[s] = (n_train, n_held)
        task = progress.add_task(f"training {len(missing)} SAE(s) (steps)", total=None) if progress else None
        trained = train_saes(acts, tcfg, lm.name, device,
                             (lambda done, total: progress.update(task, completed=done, total=total)) if progress else None)
        corpus_meta = {"sources": corpus.sources, "identity": corpus.identity, "n_texts": len(corpus.texts),
                       "heldout_frac": corpus.heldout_frac, "seed": corpus.seed, "seq_len": ccfg.seq_len}
        for s in missing:
            with fixed_threads(tcfg.threads):  # its sums' last digits depend on the thread count
                stats = evaluate_sae(trained[s], held[s]).to_dict()
            stats["n_train_tokens"] = int(acts[s].shape[0])
            stats["n_outliers_dropped"] = {"train": dropped[s][0], "heldout": dropped[s][1]}
            meta = {"site": s.name, "model": lm.name, "model_fingerprint": lm.fingerprint, "key": keys[s], "code": TRAINING_VERSION,
                    "weights": weights_hash(trained[s]), "numerics": numerics_info(device), "train": asdict(tcfg),
                    "corpus": corpus_meta, "stats": stats}
            save_sae(trained[s], dirs[s], meta)
            sae = load_sae(str(dirs[s]), device)
            out[s] = (sae, _info(s, dirs[s], "trained", sae))
    return out


def neuron_units(lm, layer: int) -> NeuronUnits:
    """The layer's MLP neurons; a neuron's direction norm is its down-projection column's norm."""
    site = Site(layer, "mlp.neurons")
    return NeuronUnits(site, site_dim(lm.model, site), down_proj_weight(lm.model, layer).float().norm(dim=0).cpu())


@dataclass
class BaselineConfig(Config):
    """Same-site baselines: complete dictionaries at each feature site, chosen and ablated as the features are."""

    baselines: list[str] = option(help="Baselines at each feature site: 'basis' (the site's own coordinates; at resid.post the "
                                       "residual stream's basis), 'pca' (PCA of the site on the corpus's training texts) and/or "
                                       "'random' (random orthonormal directions); all complete and never sparsified; empty (\"\"): none.",
                                  factory=lambda: list(BASELINES), choices=BASELINES, label="baseline", unique=True,
                                  allow_empty=True)
    fit_tokens: int = option(4096, "Corpus training-text tokens the PCA / random-direction baselines are fitted on (outliers "
                                   "dropped as for the SAEs).", min=16, max=MAX_TOKENS, flag="baseline-fit-tokens")
    seed: int = option(0, "Seed of the random-direction baselines.", flag="baseline-seed")


def site_baselines(lm, sites: Sequence[Site], cfg: BaselineConfig, ccfg: CorpusConfig, outlier_factor: float,
                   cache_dir: str | None = None, progress: Progress | None = None) -> dict[Site, list[Units]]:
    """``cfg.baselines`` at each site (``baseline_units``); PCA and random directions are fitted on the corpus's
    training texts, every site from one activation pass."""
    sites = list(dict.fromkeys(sites))
    if not cfg.baselines or not sites:
        return {s: [] for s in sites}
    acts: dict[Site, torch.Tensor] = {}
    if set(cfg.baselines) - {"basis"}:
        train_texts, _ = build_corpus(lm, ccfg, progress, cache_dir).split()
        got = collect_activations(lm, sites, train_texts, cfg.fit_tokens, ccfg.seq_len, progress=progress)
        acts = {s: drop_outliers(got[s].float(), outlier_factor)[0] for s in sites}
    out = {}
    for s in sites:
        a = acts.get(s, torch.zeros(1, site_dim(lm.model, s)))
        out[s] = [baseline_units(kind, s, a, cfg.seed + s.layer) for kind in cfg.baselines]
    return out


def unit_sets_for_layers(
    lm,
    layers: Sequence[int],
    feature_kind: str,
    sae_paths: Sequence[str] | None,
    tcfg: TrainSAEConfig,
    ccfg: CorpusConfig,
    device: str = "cpu",
    cache_dir: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[tuple[NeuronUnits, FeatureUnits]], dict[int, SAEInfo]]:
    """``(neurons, features)`` per layer, and each layer's ``SAEInfo`` (SAEs for all layers from one pass)."""
    if not layers:
        raise KscopeError("no layers given")
    if sae_paths and len(sae_paths) != len(layers):
        raise KscopeError(f"{len(sae_paths)} SAE(s) given for {len(layers)} layer(s); give one per layer")
    sites = [Site(L, feature_kind) for L in layers]
    got = obtain_saes(lm, sites, tcfg, ccfg, device, cache_dir, progress, dict(zip(sites, sae_paths)) if sae_paths else None)
    out = [(neuron_units(lm, s.layer), feature_units(lm.model, got[s][0], s)) for s in sites]
    return out, {s.layer: got[s][1] for s in sites}


@dataclass
class TrainSAEJob(Config):
    """Train TopK SAEs (SAELens) on many sites from one activation pass; save them in SAELens format with
    their held-out MSE / explained variance / L0 / dead fraction."""

    model: ModelConfig = nested(ModelConfig)
    layers: list[int] = option(help="Layers: 12, 10,12 or 0-29.", factory=lambda: [12], parse=parse_layers, min=0)
    sites: list[str] = option(help="Site kinds.", factory=lambda: ["mlp.out"], choices=("mlp.out", "resid.post", "mlp.neurons"),
                              label="site kind", unique=True)
    train: TrainSAEConfig = nested(TrainSAEConfig)
    corpus: CorpusConfig = nested(CorpusConfig)
    out: str | None = option(None, "Directory for the SAEs (one sub-directory L<layer>-<kind> each); default: kscope's SAE cache, "
                                   "where compare / sweep / analyses find them.", output="dir")
    site: str | None = option(None, "A single LAYER/KIND (or SAELens hook name) instead of --layers/--sites; with --out, the SAE is "
                                    "written to --out itself.")

    def targets(self) -> list[Site]:
        if self.site:
            return [Site.parse(self.site)]
        return [Site(L, k) for L in self.layers for k in self.sites]

    def out_dirs(self) -> dict[Site, Path] | None:
        """Where each SAE goes with ``--out`` (None: the cache)."""
        if not self.out:
            return None
        return {s: Path(self.out) if self.site is not None else Path(self.out) / f"L{s.layer}-{s.kind}" for s in self.targets()}

    def written_inside(self) -> list[str] | None:
        """Each SAE directory, written whole (with ``--site``: ``--out`` itself)."""
        return None if self.site is not None else [f"L{s.layer}-{s.kind}" for s in self.targets()]


def train_sae_job(cfg: TrainSAEJob) -> dict[Site, SAEInfo]:
    """Train (or find cached) SAEs for every requested site; returns their ``SAEInfo``."""
    from kscope.model.loading import load_model
    from kscope.progress import make_progress

    sites = cfg.targets()
    out_dirs = cfg.out_dirs()
    for d in (out_dirs or {}).values():
        if d.exists() and not (d / "cfg.json").exists() and (not d.is_dir() or any(d.iterdir())):
            raise KscopeError(f"--out {d} exists and is not an SAE directory; refusing to overwrite")
    cfg.check_writes()
    lm = load_model(cfg.model)
    with make_progress() as progress:
        got = obtain_saes(lm, sites, cfg.train, cfg.corpus, cfg.model.device, cfg.model.cache_dir, progress, out_dirs=out_dirs)
    return {s: got[s][1] for s in sites}


def find_cached_sae(lm, site: Site, cache_dir: str | None = None) -> Path | None:
    """The most recently written cached SAE of this model at ``site``, whatever its options (benchmarks, notebooks)."""
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "saes" / f"{model_slug(lm.name)}-{lm.fingerprint}"
    found = [d for d in root.glob(f"L{site.layer}-{site.kind}-*") if (d / "cfg.json").exists()]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None
