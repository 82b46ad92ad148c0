"""Text for SAEs and analyses (files, a HF dataset, text sampled from the model) and site activations over it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import Progress

from kscope.config import Config, option
from kscope.errors import KscopeError
from kscope.facts import Fact
from kscope.io import read_json, write_json
from kscope.model.hooks import site_activations
from kscope.model.loading import default_cache_dir, model_slug
from kscope.model.readout import pad_rows
from kscope.model.sites import Site
from kscope.units.training import TrainSAEConfig


@dataclass
class CorpusConfig(Config):
    """Text the SAE is trained on: fact prompts, model-generated text, files, a HF dataset."""

    text_files: list[str] = option(help="Plain-text files (paragraphs split on blank lines).", factory=list, flag="text")
    dataset: str | None = option(None, "HF dataset name or path (needs it reachable).")
    dataset_limit: int = option(2000, "Rows read from the dataset.", min=1)


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


def cached_generation(lm, n: int, length: int, seed: int, progress: Progress | None = None, cache_dir: str | None = None) -> list[str]:
    """``generate_texts`` with an on-disk cache per (model, n, length, seed): sampling is the slow part."""
    if n <= 0:
        return []
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / "texts" / model_slug(lm.name) / f"gen-n{n}-len{length}-s{seed}.json"
    if path.exists():
        return read_json(path)
    texts = generate_texts(lm, n, length, seed, progress=progress)
    write_json(path, texts)
    return texts


def sae_corpus(lm, facts: Sequence[Fact], tcfg: TrainSAEConfig, ccfg: CorpusConfig, progress: Progress | None = None) -> list[str]:
    """Fact prompts + files + dataset + ``tcfg.generate`` sequences sampled from the model, shuffled (seeded)."""
    texts = list(dict.fromkeys(p for f in facts for p in f.prompts))
    texts += read_texts(ccfg.text_files)
    if ccfg.dataset:
        texts += hf_dataset_texts(ccfg.dataset, limit=ccfg.dataset_limit)
    texts += cached_generation(lm, tcfg.generate, tcfg.gen_len, tcfg.seed, progress)
    if not texts:
        raise KscopeError("the SAE training corpus is empty")
    random.Random(tcfg.seed).shuffle(texts)
    return texts
