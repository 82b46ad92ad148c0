"""Train TopK SAEs with SAELens' own ``SAETrainer`` and ``TopKTrainingSAE``, fed from activations that kscope
collects with its hooks (SAELens' runner needs a TransformerLens model, which GGUF/HF-only models lack)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch

from kscope.config import Config, option
from kscope.model.sites import Site


@dataclass
class TrainSAEConfig(Config):
    """How to train a TopK SAE (SAELens) on a site's activations."""

    expansion: int = option(8, "d_sae = expansion x site width.", min=1)
    k: int = option(32, "Active features per token (TopK).", min=1)
    lr: float = option(4e-4, "Adam learning rate.", min=1e-12)
    batch_tokens: int = option(512, "Tokens per training step.", min=1)
    epochs: int = option(8, "Passes over the collected activations.", min=1)
    max_tokens: int = option(60_000, "Activation tokens to collect.", min=1, aliases=("tokens",))
    generate: int = option(256, "Sequences of model-sampled text added to the corpus (no network needed).", min=0)
    gen_len: int = option(64, "Tokens per generated sequence.", min=1)
    seq_len: int = option(64, "Window length when chunking text.", min=2)
    eval_frac: float = option(0.1, "Held-out fraction of tokens for the SAE's statistics.", min=0.01, max=0.9)
    seed: int = option(0, "Random seed of the SAE (init, batches, split).")


class _Shuffled(Iterator[torch.Tensor]):
    """Endless shuffled minibatches over an activation tensor (a SAELens DataProvider)."""

    def __init__(self, acts: torch.Tensor, batch: int, seed: int, device: str):
        self.acts, self.batch, self.device = acts, batch, device
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(acts.shape[0], generator=self.gen), 0

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch > self.order.numel():
            self.order, self.pos = torch.randperm(self.acts.shape[0], generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return self.acts[idx].to(self.device)


def train_sae_on_acts(acts: torch.Tensor, cfg: TrainSAEConfig, site: Site, model_name: str, device: str = "cpu"):
    """Train a SAELens TopK SAE on ``acts`` ``[n, d]``; returns the inference SAE."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(cfg.seed)
    d_in = acts.shape[1]
    batch = min(cfg.batch_tokens, acts.shape[0])
    tcfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.expansion * d_in, k=cfg.k, device=device)
    tcfg.metadata.hook_name = site.hook_name
    tcfg.metadata.model_name = model_name
    sae = TopKTrainingSAE(tcfg)
    # Start b_dec at the data mean (the geometric-median init of the SAE literature, cheaply).
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0).to(sae.b_dec.device))
    steps = max(1, math.ceil(cfg.epochs * acts.shape[0] / batch))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=cfg.lr,
        lr_scheduler_name="constant",
        lr_decay_steps=steps // 5,
        lr_end=cfg.lr / 10,
        device=device,
        dead_feature_window=max(50, steps // 4),
        feature_sampling_window=max(100, steps // 2),
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(trainer_cfg, sae, _Shuffled(acts, batch, cfg.seed, device))
    trained = trainer.fit()
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        from sae_lens import SAE

        return SAE.load_from_disk(tmp, device=device)
