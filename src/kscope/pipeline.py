"""Shared steps of the commands: obtain SAEs (given, cached, or trained) and build unit sets."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rich.progress import Progress

from kscope.errors import KscopeError
from kscope.facts import Fact
from kscope.io import read_json, write_json
from kscope.models import default_cache_dir
from kscope.sae import (
    TrainSAEConfig,
    collect_activations,
    evaluate_sae,
    feature_units,
    generate_texts,
    hf_dataset_texts,
    load_sae,
    read_texts,
    save_sae,
    train_sae_on_acts,
)
from kscope.sites import Site, check_layer, site_dim
from kscope.units import NeuronUnits, Units


@dataclass
class CorpusConfig:
    """Text the SAE is trained on: fact prompts, model-generated text, files, a HF dataset."""

    text_files: list[str] = field(default_factory=list, metadata={"help": "Plain-text files (paragraphs split on blank lines)."})
    dataset: str | None = field(default=None, metadata={"help": "HF dataset name or path (needs it reachable)."})
    dataset_limit: int = field(default=2000, metadata={"help": "Rows read from the dataset."})


def model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/"))[-80:]


def cached_generation(lm, tcfg: TrainSAEConfig, progress: Progress | None = None, cache_dir: str | None = None) -> list[str]:
    """``generate_texts`` with an on-disk cache per (model, n, length, seed): sampling is the slow part."""
    if tcfg.generate <= 0:
        return []
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / "texts" / model_slug(lm.name) / f"gen-n{tcfg.generate}-len{tcfg.gen_len}-s{tcfg.seed}.json"
    if path.exists():
        return read_json(path)
    texts = generate_texts(lm, tcfg.generate, tcfg.gen_len, tcfg.seed, progress=progress)
    write_json(path, texts)
    return texts


def sae_corpus(lm, facts: Sequence[Fact], tcfg: TrainSAEConfig, ccfg: CorpusConfig, progress: Progress | None = None) -> list[str]:
    """Fact prompts + files + dataset + ``tcfg.generate`` sequences sampled from the model, shuffled (seeded)."""
    texts = list(dict.fromkeys(p for f in facts for p in f.prompts))
    texts += read_texts(ccfg.text_files)
    if ccfg.dataset:
        texts += hf_dataset_texts(ccfg.dataset, limit=ccfg.dataset_limit)
    texts += cached_generation(lm, tcfg, progress)
    if not texts:
        raise KscopeError("the SAE training corpus is empty")
    random.Random(tcfg.seed).shuffle(texts)
    return texts


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
    """The SAE at ``site``: from ``sae_path``, else from the cache, else trained (and cached)."""
    if sae_path:
        return load_sae(sae_path, device)
    cdir = cached_sae_dir(lm.name, site, tcfg, cache_dir)
    if (cdir / "cfg.json").exists():
        return load_sae(str(cdir), device)
    sae, stats = train_sae(lm, site, tcfg, corpus(), device, progress)
    save_sae(sae, cdir, {"site": site.name, "model": lm.name, "stats": stats})
    return sae


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
) -> list[tuple[Units, Units]]:
    """``(neurons, features)`` per layer."""
    if not layers:
        raise KscopeError("no layers given")
    for layer in layers:
        check_layer(lm.model, layer)
    if sae_paths and len(sae_paths) != len(layers):
        raise KscopeError(f"{len(sae_paths)} SAE(s) given for {len(layers)} layer(s); give one per layer")
    out = []
    texts: list[str] | None = None

    def cached_corpus() -> list[str]:
        nonlocal texts
        if texts is None:
            texts = corpus()
        return texts

    for i, layer in enumerate(layers):
        site = Site(layer, feature_kind)
        sae = obtain_sae(lm, site, sae_paths[i] if sae_paths else None, tcfg, cached_corpus, device, cache_dir, progress)
        feats = feature_units(lm.model, sae, site)
        if feats.site.layer != layer:
            raise KscopeError(f"SAE {sae_paths[i] if sae_paths else ''} is for layer {feats.site.layer}, not {layer}")
        out.append((neuron_units(lm, layer), feats))
    return out
