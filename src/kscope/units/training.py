"""Train TopK SAEs with SAELens' own ``SAETrainer`` and ``TopKTrainingSAE``, fed from activations that kscope
collects with its hooks (SAELens' runner needs a TransformerLens model, which GGUF/HF-only models lack)."""

from __future__ import annotations

import functools
import hashlib
import math
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from kscope.config import MAX_EPOCHS, MAX_EXPANSION, MAX_TOKENS, Config, option
from kscope.errors import KscopeError
from kscope.model.sites import Site
from kscope.numerics import fixed_threads


@dataclass
class TrainSAEConfig(Config):
    """How to train TopK SAEs (SAELens) on sites' activations."""

    expansion: int = option(2, "SAE width = expansion x site width. 2: on SmolLM2's 1024-sequence corpus a 2x SAE explains more "
                                "held-out variance than a 4x one at 45 % of its training time (0.815 vs 0.805, layer-12 mlp.out).",
                            min=1, max=MAX_EXPANSION)
    k: int = option(128, "Active features per token (TopK). SmolLM2's MLP outputs need 128 for held-out explained variance "
                         ">= 0.8 on 300k tokens (k 32: 0.65, k 64: 0.72).", min=1)
    lr: float = option(3e-3, "Adam learning rate.", min=1e-12)
    batch_tokens: int = option(512, "Tokens per training step.", min=1, max=MAX_TOKENS)
    epochs: int = option(16, "Passes over the collected activations.", min=1, max=MAX_EPOCHS)
    max_tokens: int = option(120_000, "Activation tokens to collect (training texts; held-out texts come on top).", min=1,
                             max=MAX_TOKENS, aliases=("tokens",))
    aux_coef: float = option(1.0, "Weight of SAELens' TopK auxiliary loss, which revives dead features.", min=0.0)
    dead_window: int = option(200, "Steps without firing after which a feature counts as dead (for the auxiliary loss).", min=1)
    outlier_factor: float = option(10.0, "Tokens whose activation norm exceeds this multiple of the site's median norm are left out "
                                         "of training and of the SAE's statistics (SmolLM2's secondary attention sinks: resid.post "
                                         "norm ~24,000 against a median of ~140, 0.06 % of tokens but 97 % of the variance); 0 keeps all.",
                                   min=0.0)
    seed: int = option(0, "Random seed of the SAEs (init, batch order).")
    threads: int = option(2, "torch threads of SAE training and its statistics, whatever the process uses: torch's long "
                             "reductions (gradient norms, losses) depend on the thread count, so a fixed count gives the "
                             "same SAE on any thread setting.", min=1, max=256)


def outlier_mask(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """Rows of ``acts`` ``[n, d]`` to keep: norm at most ``factor`` x the median row norm (all rows when ``factor`` is 0)."""
    norms = acts.float().norm(dim=-1)
    if factor <= 0 or norms.numel() == 0:
        return torch.ones_like(norms, dtype=torch.bool)
    return norms <= factor * norms.median()


def drop_outliers(acts: torch.Tensor, factor: float) -> tuple[torch.Tensor, int]:
    """``acts`` without its outlier rows (``outlier_mask``), and how many were dropped."""
    keep = outlier_mask(acts, factor)
    return acts[keep], int((~keep).sum())


class _SharedBatches(Iterator[dict[str, torch.Tensor]]):
    """Endless shuffled minibatches, one activation tensor per hook (a SAELens multi-hook DataProvider). Each hook
    has its own order from the same seed, so hooks with the same number of rows see the same rows at every step."""

    def __init__(self, acts: dict[str, torch.Tensor], batch: int, seed: int, device: str, on_step=None, steps: int = 0):
        self.acts, self.batch, self.device, self.on_step, self.steps, self.served = acts, batch, device, on_step, steps, 0
        self.gens = {h: torch.Generator().manual_seed(seed) for h in acts}
        self.order = {h: torch.randperm(a.shape[0], generator=self.gens[h]) for h, a in acts.items()}
        self.pos = {h: 0 for h in acts}

    def __next__(self) -> dict[str, torch.Tensor]:
        out = {}
        for h, a in self.acts.items():
            if self.pos[h] + self.batch > a.shape[0]:
                self.order[h], self.pos[h] = torch.randperm(a.shape[0], generator=self.gens[h]), 0
            idx = self.order[h][self.pos[h] : self.pos[h] + self.batch]
            self.pos[h] += self.batch
            out[h] = a[idx].to(self.device, torch.float32)
        self.served += 1
        if self.on_step and self.served <= self.steps:
            self.on_step(self.served)
        return out


def check_width(cfg: TrainSAEConfig, d_in: int) -> None:
    """Refuse a TopK ``k`` larger than the SAE (every feature would fire)."""
    if cfg.k > cfg.expansion * d_in:
        raise KscopeError(f"SAE k={cfg.k} exceeds the SAE width {cfg.expansion * d_in} (expansion {cfg.expansion} x {d_in}); "
                          "lower k or raise the expansion")


TRAINING_VERSION = 2
"""Bumped whenever the training code changes what it produces: part of every SAE cache key, so a cached SAE
from older code never answers for newer code."""


def site_seed(seed: int, site: Site) -> int:
    """The seed of one site's SAE: its initialisation does not depend on which SAEs are trained beside it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{site.name}".encode()).digest()[:4], "little")


def batch_and_steps(cfg: TrainSAEConfig, n_rows: int) -> tuple[int, int]:
    """Batch size and steps of a site's SAE with ``n_rows`` training rows: ``epochs`` passes over its own rows."""
    batch = min(cfg.batch_tokens, n_rows)
    return batch, max(1, math.ceil(cfg.epochs * n_rows / batch))


def train_saes(acts: dict[Site, torch.Tensor], cfg: TrainSAEConfig, model_name: str, device: str = "cpu",
               on_step: Callable[[int, int], None] | None = None) -> dict[Site, object]:
    """Train one SAELens TopK SAE per site, side by side (SAELens' ``MultiSAETrainer``: every step feeds each
    SAE a batch of its site's activations ``[n_site, d]``, the same tokens where the sites keep the same rows);
    returns the inference SAEs. Outliers (``cfg.outlier_factor``) are assumed removed already.

    Each SAE depends only on its own site's activations and the options: its seed, its data order, its
    ``b_dec`` and the number of steps are its own, so training it alone or beside others gives the same
    weights, bit for bit on CPU (``kscope.numerics``). ``on_step(done, total)`` hears of every training step (all groups)."""
    groups: dict[tuple[int, int], dict[Site, torch.Tensor]] = {}
    for site, a in acts.items():  # SAEs of the same batch and steps train in lockstep
        groups.setdefault(batch_and_steps(cfg, a.shape[0]), {})[site] = a
    out: dict[Site, object] = {}
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        total, done = sum(steps for _, steps in groups), 0
        with fixed_threads(cfg.threads):
            for (batch, steps), part in groups.items():
                step = (lambda i, d=done: on_step(d + i, total)) if on_step else None
                out.update(_train_group(part, cfg, model_name, device, batch, steps, step))
                done += steps
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return {site: out[site] for site in acts}


def _train_group(acts: dict[Site, torch.Tensor], cfg: TrainSAEConfig, model_name: str, device: str, batch: int,
                 steps: int, on_step: Callable[[int], None] | None = None) -> dict[Site, object]:
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    saes, hooks = {}, {}
    for site, a in acts.items():
        check_width(cfg, a.shape[1])
        tcfg = TopKTrainingSAEConfig(d_in=a.shape[1], d_sae=cfg.expansion * a.shape[1], k=cfg.k, device=device,
                                     aux_loss_coefficient=cfg.aux_coef)
        tcfg.metadata.hook_name = site.hook_name
        tcfg.metadata.model_name = model_name
        torch.manual_seed(site_seed(cfg.seed, site))
        sae = TopKTrainingSAE(tcfg)
        with torch.no_grad():  # b_dec at the data mean: a cheap stand-in for the geometric median
            head = a[:65536].double()
            mean = torch.ones(1, head.shape[0], dtype=torch.float64) @ head / head.shape[0]  # a product: no thread-split sum
            sae.b_dec.copy_(mean[0].to(sae.b_dec.device, sae.b_dec.dtype))
        saes[site.name], hooks[site.name] = sae, site.hook_name
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=cfg.lr,
        lr_scheduler_name="constant",
        lr_decay_steps=steps // 5,
        lr_end=cfg.lr / 10,
        device=device,
        dead_feature_window=cfg.dead_window,
        feature_sampling_window=max(cfg.dead_window, steps // 4),
        logger=LoggingConfig(log_to_wandb=False),
    )
    data = _SharedBatches({site.hook_name: a for site, a in acts.items()}, batch, cfg.seed, device, on_step, steps)
    from sae_lens.training import multi_sae_trainer

    bar = multi_sae_trainer.tqdm
    multi_sae_trainer.tqdm = functools.partial(bar, disable=True)  # SAELens' own bar; kscope shows its progress
    try:
        trained = MultiSAETrainer(trainer_cfg, saes, hooks, data).fit()
    finally:
        multi_sae_trainer.tqdm = bar
    out = {}
    for site in acts:
        with tempfile.TemporaryDirectory() as tmp:
            trained[site.name].save_inference_model(tmp)
            out[site] = SAE.load_from_disk(tmp, device=device)
    return out


def train_sae_on_acts(acts: torch.Tensor, cfg: TrainSAEConfig, site: Site, model_name: str, device: str = "cpu"):
    """One SAE on ``acts`` ``[n, d]`` (``train_saes`` with a single site)."""
    return train_saes({site: acts}, cfg, model_name, device)[site]
