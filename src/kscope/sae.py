"""SAEs in SAELens format: load (directory or pretrained release), train on a site, evaluate.

Training uses SAELens' own ``SAETrainer`` and ``TopKTrainingSAE`` fed from activations that kscope
collects with its hooks (SAELens' runner needs a TransformerLens model, which GGUF/HF-only models lack).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from rich.progress import Progress

from kscope.errors import KscopeError
from kscope.hooks import site_activations
from kscope.io import atomic_dir
from kscope.scoring import pad_rows
from kscope.sites import Site, check_layer, site_dim
from kscope.units import FeatureUnits


def load_sae(source: str, device: str = "cpu", sae_id: str | None = None):
    """A SAELens SAE from a directory (``cfg.json`` + ``sae_weights.safetensors``) or, given
    ``sae_id``, from a SAELens pretrained release name (needs the hub)."""
    from sae_lens import SAE

    p = Path(source)
    if p.is_dir():
        if not (p / "cfg.json").exists():
            raise KscopeError(f"{p} is not a SAELens SAE directory (no cfg.json)")
        return SAE.load_from_disk(p, device=device)
    if sae_id is None:
        raise KscopeError(f"SAE {source!r} is not a directory; for a pretrained release also give --sae-id")
    try:
        return SAE.from_pretrained(source, sae_id, device=device)
    except Exception as e:  # noqa: BLE001 - the hub or the release table can fail many ways
        raise KscopeError(f"cannot load pretrained SAE {source}/{sae_id}: {e}") from e


def sae_site(sae, default: Site | None = None) -> Site:
    """The site an SAE was trained on, from its SAELens ``hook_name`` metadata."""
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    if hook:
        try:
            return Site.parse(hook)
        except KscopeError:
            pass
    if default is None:
        raise KscopeError(f"cannot tell the SAE's site from hook_name={hook!r}; pass --site")
    return default


def feature_units(model, sae, site: Site | None = None) -> FeatureUnits:
    site = sae_site(sae, site)
    check_layer(model, site.layer)
    d = site_dim(model, site)
    if int(sae.cfg.d_in) != d:
        raise KscopeError(f"SAE d_in={sae.cfg.d_in} does not match {site.name} width {d}")
    return FeatureUnits(site, sae)


@dataclass
class TrainSAEConfig:
    """Train a TopK SAE (SAELens) on one site of the model."""

    site: str = field(default="12/mlp.out", metadata={"help": "LAYER/KIND to train on: mlp.out, resid.post or mlp.neurons."})
    expansion: int = field(default=8, metadata={"help": "d_sae = expansion x site width."})
    k: int = field(default=32, metadata={"help": "Active features per token (TopK)."})
    lr: float = field(default=4e-4, metadata={"help": "Adam learning rate."})
    batch_tokens: int = field(default=512, metadata={"help": "Tokens per training step."})
    epochs: int = field(default=8, metadata={"help": "Passes over the collected activations."})
    max_tokens: int = field(default=60_000, metadata={"help": "Activation tokens to collect."})
    generate: int = field(default=256, metadata={"help": "Sequences of model-sampled text added to the corpus (no network needed)."})
    gen_len: int = field(default=64, metadata={"help": "Tokens per generated sequence."})
    seq_len: int = field(default=64, metadata={"help": "Window length when chunking text files."})
    eval_frac: float = field(default=0.1, metadata={"help": "Held-out fraction of tokens for the report."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


@dataclass
class SAEStats:
    """Reconstruction quality on held-out activations."""

    mse: float
    explained_variance: float
    l0: float
    dead_fraction: float
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def sae_stats(x: torch.Tensor, x_hat: torch.Tensor, u: torch.Tensor) -> SAEStats:
    """Pure metrics. ``x, x_hat``: ``[n, d]``; ``u``: ``[n, d_sae]`` feature activations."""
    if x.shape[0] == 0:
        raise KscopeError("no activations to evaluate")
    err = (x - x_hat).pow(2).sum(-1)
    var = (x - x.mean(0, keepdim=True)).pow(2).sum(-1)
    active = u != 0
    return SAEStats(
        mse=float(err.mean() / x.shape[1]),
        explained_variance=float(1 - err.sum() / var.sum().clamp_min(1e-12)),
        l0=float(active.sum(-1).float().mean()),
        dead_fraction=float((~active.any(0)).float().mean()),
        n_tokens=int(x.shape[0]),
    )


@torch.no_grad()
def evaluate_sae(sae, acts: torch.Tensor, batch: int = 4096) -> SAEStats:
    xs, xh, us = [], [], []
    for i in range(0, acts.shape[0], batch):
        x = acts[i : i + batch].to(sae.W_enc.device, sae.W_enc.dtype)
        u = sae.encode(x)
        xs.append(x.cpu())
        xh.append(sae.decode(u).cpu())
        us.append(u.cpu())
    return sae_stats(torch.cat(xs), torch.cat(xh), torch.cat(us))


def read_texts(paths: Sequence[str]) -> list[str]:
    texts = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise KscopeError(f"text file {p} does not exist")
        texts.extend(t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip())
    return texts


def hf_dataset_texts(name: str, split: str = "train", column: str = "text", limit: int = 2000) -> list[str]:
    """Texts from a HF dataset (needs the hub or a local dataset path)."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split, streaming=True)
        return [row[column] for _, row in zip(range(limit), ds) if row.get(column)]
    except Exception as e:  # noqa: BLE001
        raise KscopeError(f"cannot read dataset {name}: {e}") from e


@torch.no_grad()
def generate_texts(lm, n: int, length: int, seed: int = 0, batch: int = 16, progress: Progress | None = None) -> list[str]:
    """Sample ``n`` continuations from the model itself: an offline activation source.

    Each batch shares one one-word opening, so no padding is needed.
    """
    if n <= 0:
        return []
    tok = lm.tokenizer
    starts = ["The", "In", "A", "Many", "It", "History", "Science", "People", "Today", "When", "One", "There"]
    torch.manual_seed(seed)
    task = progress.add_task("generating text", total=n) if progress else None
    out: list[str] = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        ids = torch.tensor([tok(starts[(i // batch) % len(starts)]).input_ids] * b, device=lm.device)
        seqs = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                                 max_new_tokens=length, pad_token_id=tok.pad_token_id)
        out.extend(tok.decode(s_, skip_special_tokens=True) for s_ in seqs)
        if progress:
            progress.advance(task, b)
    return out


def collect_activations(lm, site: Site, texts: Sequence[str], max_tokens: int, seq_len: int = 64,
                        batch_tokens: int = 2048, progress: Progress | None = None) -> torch.Tensor:
    """Site activations of every real token of ``texts`` (cut into ``seq_len`` windows), ``[n_tokens, d]``.

    Windows are taken in order until ``max_tokens``; then grouped by length into batches of about
    ``batch_tokens`` tokens, so little compute goes to padding.
    """
    tok = lm.tokenizer
    chunks: list[list[int]] = []
    total = 0
    for t in texts:
        ids = tok(t, add_special_tokens=True).input_ids
        for i in range(0, len(ids), seq_len):
            if total >= max_tokens:
                break
            chunks.append(ids[i : i + seq_len])
            total += len(chunks[-1])
        if total >= max_tokens:
            break
    if not chunks:
        raise KscopeError("no text to collect activations from")
    chunks.sort(key=len)
    task = progress.add_task(f"activations {site.name}", total=total) if progress else None
    pad = tok.pad_token_id or 0
    rows, i = [], 0
    while i < len(chunks):
        j = i + 1
        while j < len(chunks) and (j - i + 1) * len(chunks[j]) <= batch_tokens:  # sorted: chunks[j] is the widest
            j += 1
        part, i = chunks[i:j], j
        ids, mask = pad_rows(part, pad)
        acts = site_activations(lm.model, [site], ids.to(lm.device), mask.to(lm.device))[site]
        rows.append(acts[mask.bool().to(acts.device)].float().cpu())
        if progress:
            progress.advance(task, int(mask.sum()))
    out = torch.cat(rows)[:max_tokens]
    # Undo the length sort so held-out splits are not all short prompts.
    return out[torch.randperm(out.shape[0], generator=torch.Generator().manual_seed(0))]


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


def save_sae(sae, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``sae`` in SAELens format to ``out_dir`` atomically (plus ``kscope.json`` with ``extra``)."""
    with atomic_dir(out_dir) as tmp:
        sae.save_model(tmp)
        if extra is not None:
            (tmp / "kscope.json").write_text(json.dumps(extra, indent=2))
    return Path(out_dir)
