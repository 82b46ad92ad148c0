"""The centre of every unit set's edits: each unit's mean code over the corpus.

Fitted as the same-site baselines are: the site's activations on the corpus's training texts (``--baseline-fit-tokens``
tokens, each window's first token left out, outlier tokens dropped as for the SAEs), encoded by the set and averaged.
One activation pass serves every site (grouped to bound memory); PCA and random directions get a mean code of ~0 (their
codes are centred on the same tokens' mean), the basis the site's mean, neurons and features their mean activation.
"""

from __future__ import annotations

from typing import Sequence

import torch
from rich.progress import Progress

from kscope.model.sites import Site, site_dim
from kscope.units.base import Units
from kscope.units.corpus import CorpusConfig, build_corpus, collect_activations
from kscope.units.training import drop_outliers

MAX_FLOATS = 2**26
"""Most activation floats held at once (256 MB): sites beyond it take another pass."""


def mean_code(units: Units, acts: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[n_units]`` float32 on the CPU: the mean of ``units.encode`` over the rows of ``acts`` ``[N, d]``."""
    total = torch.zeros(units.n_units, dtype=torch.float64)
    with torch.no_grad():
        for a in range(0, acts.shape[0], chunk):
            total += units.encode(acts[a : a + chunk]).double().sum(0).cpu()
    return (total / max(acts.shape[0], 1)).float()


def _groups(lm, sites: Sequence[Site], tokens: int) -> list[list[Site]]:
    out: list[list[Site]] = [[]]
    used = 0
    for s in sites:
        w = site_dim(lm.model, s) * tokens
        if out[-1] and used + w > MAX_FLOATS:
            out.append([])
            used = 0
        out[-1].append(s)
        used += w
    return out


def fit_code_means(lm, sets: Sequence[Units], fit_tokens: int, ccfg: CorpusConfig, outlier_factor: float,
                   cache_dir: str | None = None, progress: Progress | None = None) -> list[torch.Tensor]:
    """Each set's mean code (aligned with ``sets``), also set as its ``code_mean``: the centre its edits move toward."""
    sites = sorted({u.site for u in sets}, key=lambda s: (s.layer, s.kind))
    train_texts, _ = build_corpus(lm, ccfg, progress, cache_dir).split()
    means: dict[int, torch.Tensor] = {}
    for group in _groups(lm, sites, fit_tokens):
        got = collect_activations(lm, group, train_texts, fit_tokens, ccfg.seq_len, progress=progress)
        for s in group:
            acts = drop_outliers(got[s].float(), outlier_factor)[0]
            for j, u in enumerate(sets):
                if u.site == s:
                    means[j] = mean_code(u, acts)
    for j, u in enumerate(sets):
        u.code_mean = means[j]
    return [means[j] for j in range(len(sets))]


def apply_centres(sets: Sequence[Units], means: dict[str, torch.Tensor] | None) -> None:
    """Set each set's ``code_mean`` from ``means`` (keyed by label; a worker's copy of the main process's fit), or None."""
    for u in sets:
        u.code_mean = (means or {}).get(u.label)


def edit_centres(ablate_to: str, lm, sets: Sequence[Units], fit_tokens: int, ccfg: CorpusConfig, outlier_factor: float,
                 cache_dir: str | None = None, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The centres of every set's edits for ``--ablate-to``: ``mean``, each set's mean codes (``fit_code_means``), keyed by
    label for the workers; ``zero``, none (every set's codes zeroed alike). Set on the units either way."""
    if ablate_to != "mean":
        apply_centres(sets, {})
        return {}
    return {u.label: m for u, m in zip(sets, fit_code_means(lm, sets, fit_tokens, ccfg, outlier_factor, cache_dir, progress))}
