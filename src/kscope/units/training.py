"""Train TopK SAEs with SAELens' own ``SAETrainer`` and ``TopKTrainingSAE``, fed from activations that kscope
collects with its hooks (SAELens' runner needs a TransformerLens model, which GGUF/HF-only models lack)."""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch

from kscope.config import Config, option
from kscope.errors import KscopeError
from kscope.model.sites import Site


@dataclass
class TrainSAEConfig(Config):
    """How to train TopK SAEs (SAELens) on sites' activations."""

    expansion: int = option(4, "SAE width = expansion x site width (1, 4 and 8 are the studied widths).", min=1)
    k: int = option(32, "Active features per token (TopK).", min=1)
    lr: float = option(4e-4, "Adam learning rate.", min=1e-12)
    batch_tokens: int = option(1024, "Tokens per training step.", min=1)
    epochs: int = option(2, "Passes over the collected activations.", min=1)
    max_tokens: int = option(300_000, "Activation tokens to collect (training texts; held-out texts come on top).", min=1,
                             aliases=("tokens",))
    aux_coef: float = option(1.0, "Weight of SAELens' TopK auxiliary loss, which revives dead features.", min=0.0)
    dead_window: int = option(200, "Steps without firing after which a feature counts as dead (for the auxiliary loss).", min=1)
    seed: int = option(0, "Random seed of the SAEs (init, batch order).")


class _SharedBatches(Iterator[dict[str, torch.Tensor]]):
    """Endless shuffled minibatches over aligned activation tensors, one per hook (a SAELens multi-hook DataProvider)."""

    def __init__(self, acts: dict[str, torch.Tensor], batch: int, seed: int, device: str):
        self.acts, self.batch, self.device = acts, batch, device
        self.n = next(iter(acts.values())).shape[0]
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.pos + self.batch > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {h: a[idx].to(self.device, torch.float32) for h, a in self.acts.items()}


def check_width(cfg: TrainSAEConfig, d_in: int) -> None:
    """Refuse a TopK ``k`` larger than the SAE (every feature would fire)."""
    if cfg.k > cfg.expansion * d_in:
        raise KscopeError(f"SAE k={cfg.k} exceeds the SAE width {cfg.expansion * d_in} (expansion {cfg.expansion} x {d_in}); "
                          "lower k or raise the expansion")


def train_saes(acts: dict[Site, torch.Tensor], cfg: TrainSAEConfig, model_name: str, device: str = "cpu") -> dict[Site, object]:
    """Train one SAELens TopK SAE per site, side by side on aligned activations ``[n, d]`` (SAELens'
    ``MultiSAETrainer``: every step feeds each SAE the same tokens); returns the inference SAEs."""
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    torch.manual_seed(cfg.seed)
    n = next(iter(acts.values())).shape[0]
    batch = min(cfg.batch_tokens, n)
    saes, hooks = {}, {}
    for site, a in acts.items():
        check_width(cfg, a.shape[1])
        tcfg = TopKTrainingSAEConfig(d_in=a.shape[1], d_sae=cfg.expansion * a.shape[1], k=cfg.k, device=device,
                                     aux_loss_coefficient=cfg.aux_coef)
        tcfg.metadata.hook_name = site.hook_name
        tcfg.metadata.model_name = model_name
        sae = TopKTrainingSAE(tcfg)
        with torch.no_grad():  # b_dec at the data mean: a cheap stand-in for the geometric median
            sae.b_dec.copy_(a[: min(n, 65536)].float().mean(0).to(sae.b_dec.device))
        saes[site.name], hooks[site.name] = sae, site.hook_name
    steps = max(1, math.ceil(cfg.epochs * n / batch))
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
    data = _SharedBatches({site.hook_name: a for site, a in acts.items()}, batch, cfg.seed, device)
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
