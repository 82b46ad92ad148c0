"""Text for SAEs and decompositions, and site activations over it.

The corpus never contains the facts under study: it is text sampled from the model itself (the
offline default, on the model's own distribution), plain-text files, or a HF dataset when one is
reachable. Its identity is a hash of its content, so caches keyed by it change when it does.
Texts are split into training and held-out texts by a seeded hash of each text, so every
consumer (SAE training, PCA/ICA fits, faithfulness) agrees on which tokens were never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import Progress

from kscope.config import MAX_LENGTH, MAX_TEXTS, Config, option
from kscope.errors import KscopeError
from kscope.io import read_json, read_utf8, write_json
from kscope.model.hooks import site_activations
from kscope.model.loading import default_cache_dir, model_slug
from kscope.model.readout import pad_rows
from kscope.model.sampling import sample
from kscope.model.sites import Site


@dataclass
class CorpusConfig(Config):
    """Text the SAEs (and PCA/ICA) are fitted on: model-generated text, files, a HF dataset. Never fact prompts."""

    generate: int = option(768, "Sequences sampled from the model itself (the offline source; cached per model).", min=0,
                          max=MAX_TEXTS)
    gen_len: int = option(128, "Tokens per generated sequence.", min=8, max=MAX_LENGTH)
    text_files: list[str] = option(help="Plain-text files (paragraphs split on blank lines).", factory=list, flag="text", allow_empty=True,
                                   reads=True)
    dataset: str | None = option(None, "HF dataset name or path (needs it reachable).", reads=True)
    dataset_limit: int = option(2000, "Rows read from the dataset.", min=1, max=MAX_TEXTS)
    seq_len: int = option(64, "Window length when cutting text into activation windows.", min=2, max=MAX_LENGTH)
    heldout_frac: float = option(0.1, "Share of texts held out (never trained on) for SAE statistics and faithfulness.",
                                 min=0.01, max=0.9)
    seed: int = option(0, "Seed of the generated text and of the held-out split.", flag="corpus-seed")


@dataclass
class Corpus:
    """Texts and their identity (a hash of the content and the held-out rule)."""

    texts: list[str]
    sources: str
    heldout_frac: float
    seed: int

    @property
    def identity(self) -> str:
        h = hashlib.sha256(f"{self.heldout_frac}:{self.seed}:".encode())
        for t in self.texts:
            h.update(hashlib.sha256(t.encode()).digest())
        return h.hexdigest()[:16]

    def split(self) -> tuple[list[str], list[str]]:
        """``(train, heldout)`` texts: a text is held out when a seeded hash of it falls below ``heldout_frac``."""
        if len(set(self.texts)) < 2:
            raise KscopeError(f"the corpus ({len(self.texts)} texts) is too small to hold any text out; add text")
        u = [int(hashlib.sha256(f"{self.seed}:{t}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for t in self.texts]
        cut = self.heldout_frac
        if not any(v < cut for v in u):  # a small corpus: hold out at least the text of smallest hash
            cut = min(u) + 1e-12
        if all(v < cut for v in u):
            cut = max(u)
        train = [t for t, v in zip(self.texts, u) if v >= cut]
        held = [t for t, v in zip(self.texts, u) if v < cut]
        return train, held


def read_texts(paths: Sequence[str]) -> list[str]:
    texts = []
    for p in paths:
        body = read_utf8(p, f"text file {p}")
        texts.extend(t.strip() for t in body.split("\n\n") if t.strip())
    return texts


def hf_dataset_texts(name: str, split: str = "train", column: str = "text", limit: int = 2000) -> list[str]:
    """Texts from a HF dataset (needs the hub or a local dataset path)."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split, streaming=True)
        return [row[column] for _, row in zip(range(limit), ds) if row.get(column)]
    except Exception as e:  # noqa: BLE001
        raise KscopeError(f"cannot read dataset {name}: {e}") from e


GEN_VERSION = "v4"  # bumped whenever the sampler changes what it writes: cached text of older code is not reused
GEN_BATCH = 256  # sequences sampled together (each batch has a seed of its own); wide batches use the CPU better
GEN_GROUP = 64  # rows of a batch that share one opening word


@torch.no_grad()
def generate_texts(lm, n: int, length: int, seed: int = 0, start: int = 0, progress: Progress | None = None) -> list[str]:
    """Sample sequences ``start .. start + n - 1`` (top-k 50, top-p 0.95: ``generate``'s distribution, drawn by
    ``kscope.model.sampling``) from the model itself: an offline activation source.

    Sequences come in batches of ``GEN_BATCH`` with a generator seeded of their own, so a longer corpus begins with a
    shorter one (``start`` must be a multiple of ``GEN_BATCH``); each ``GEN_GROUP`` rows share a one-word opening (no
    padding: if the openings of a batch tokenize to different lengths, the batch uses its first one).
    """
    if n <= 0:
        return []
    if start % GEN_BATCH:
        raise ValueError(f"start must be a multiple of {GEN_BATCH}")
    tok = lm.tokenizer
    starts = ["The", "In", "A", "Many", "It", "History", "Science", "People", "Today", "When", "One", "There",
              "After", "She", "He", "We", "This", "Our", "If", "For"]
    opening = {w: tok(w).input_ids for w in starts}
    task = progress.add_task("generating text (tokens)", total=n * length) if progress else None
    out: list[str] = []
    for i in range(start, start + n, GEN_BATCH):
        b = min(GEN_BATCH, start + n - i)
        k = i // GEN_BATCH
        rows = [opening[starts[(k * GEN_BATCH // GEN_GROUP + j // GEN_GROUP) % len(starts)]] for j in range(b)]
        if len({len(r) for r in rows}) > 1:
            rows = [rows[0]] * b
        ids = torch.tensor(rows, device=lm.device)
        step = (lambda b=b: progress.advance(task, b)) if progress else None
        seqs = sample(lm.model, ids, length, torch.Generator().manual_seed(seed * 1_000_003 + k), eos=tok.eos_token_id,
                      pad=tok.pad_token_id if tok.pad_token_id is not None else 0, on_step=step)
        out.extend(tok.decode(s_, skip_special_tokens=True) for s_ in seqs)
        if progress:  # a batch whose every row ended early
            progress.update(task, completed=(i - start + b) * length)
    return out


def cached_text_path(lm, n: int, length: int, seed: int, cache_dir: str | None = None) -> Path:
    """Where ``cached_generation`` keeps ``n`` sequences of ``length`` tokens of ``lm`` sampled with ``seed``."""
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "texts" / f"{model_slug(lm.name)}-{lm.fingerprint}"
    return root / f"gen-n{n}-len{length}-s{seed}-{GEN_VERSION}.json"


def cached_generation(lm, n: int, length: int, seed: int, progress: Progress | None = None, cache_dir: str | None = None) -> list[str]:
    """``generate_texts`` cached on disk per (model weights, n, length, seed): sampling is the slow part. A cached
    shorter corpus of the same model, length and seed is extended rather than sampled again."""
    if n <= 0:
        return []
    path = cached_text_path(lm, n, length, seed, cache_dir)
    root = path.parent

    def read(p: Path) -> list[str] | None:
        try:
            texts = read_json(p)
            return texts if isinstance(texts, list) else None
        except (ValueError, OSError):
            return None  # a corrupt cache file is sampled again

    if path.exists() and (texts := read(path)) is not None and len(texts) == n:
        return texts
    have: list[str] = []
    for p in root.glob(f"gen-n*-len{length}-s{seed}-{GEN_VERSION}.json"):
        m = int(p.name.split("-n", 1)[1].split("-", 1)[0])
        if m < n and m % GEN_BATCH == 0 and m > len(have) and (texts := read(p)) is not None and len(texts) == m:
            have = texts
    texts = have + generate_texts(lm, n - len(have), length, seed, start=len(have), progress=progress)
    write_json(path, texts)
    return texts


def build_corpus(lm, cfg: CorpusConfig, progress: Progress | None = None, cache_dir: str | None = None) -> Corpus:
    """The corpus ``cfg`` names: files, dataset, then model-generated text."""
    texts = read_texts(cfg.text_files)
    sources = [f"files:{','.join(cfg.text_files)}"] if cfg.text_files else []
    if cfg.dataset:
        texts += hf_dataset_texts(cfg.dataset, limit=cfg.dataset_limit)
        sources.append(f"dataset:{cfg.dataset}[:{cfg.dataset_limit}]")
    if cfg.generate:
        texts += cached_generation(lm, cfg.generate, cfg.gen_len, cfg.seed, progress, cache_dir)
        sources.append(f"generated:{cfg.generate}x{cfg.gen_len}(seed {cfg.seed})")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise KscopeError("the corpus is empty: give --generate > 0, --text files or --dataset")
    return Corpus(texts, "; ".join(sources), cfg.heldout_frac, cfg.seed)


def windows(tokenizer, texts: Sequence[str], max_tokens: int, seq_len: int) -> list[list[int]]:
    """Token windows of ``seq_len`` cut from ``texts`` in order, until ``max_tokens`` tokens."""
    out: list[list[int]] = []
    total = 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True).input_ids
        for i in range(0, len(ids), seq_len):
            if total >= max_tokens:
                return out
            w = ids[i : i + seq_len][: max_tokens - total]
            out.append(w)
            total += len(w)
    return out


def collect_activations(lm, sites: Site | Sequence[Site], texts: Sequence[str], max_tokens: int, seq_len: int = 64,
                        batch_tokens: int = 2048, progress: Progress | None = None, dtype: torch.dtype = torch.float32,
                        skip_first: bool = True):
    """Activations of the real tokens of ``texts`` at each site, ``[n_tokens, d]``, rows aligned across sites
    (one forward pass per batch serves all sites). A single ``Site`` gives one tensor, a list a dict.

    ``skip_first`` leaves out each window's first token: it is the attention sink, whose residual norm
    is ~150x the others' in SmolLM2 and would dominate any fit. Windows are grouped by length into
    batches of about ``batch_tokens`` tokens (little padding); rows come back in a seeded random
    order, the same for every site.
    """
    single = isinstance(sites, Site)
    site_list = [sites] if single else list(dict.fromkeys(sites))
    chunks = windows(lm.tokenizer, texts, max_tokens, seq_len)
    if not chunks:
        raise KscopeError("no text to collect activations from")
    chunks.sort(key=len)
    if skip_first:
        chunks = [c for c in chunks if len(c) > 1]
    total = sum(len(c) - skip_first for c in chunks)
    label = site_list[0].name if len(site_list) == 1 else f"{len(site_list)} sites"
    task = progress.add_task(f"activations {label}", total=total) if progress else None
    pad = lm.tokenizer.pad_token_id or 0
    rows: dict[Site, list[torch.Tensor]] = {s: [] for s in site_list}
    i = 0
    while i < len(chunks):
        j = i + 1
        while j < len(chunks) and (j - i + 1) * len(chunks[j]) <= batch_tokens:  # sorted: chunks[j] is the widest
            j += 1
        part, i = chunks[i:j], j
        ids, mask = pad_rows(part, pad)
        acts = site_activations(lm.model, site_list, ids.to(lm.device), mask.to(lm.device))
        keep = mask.bool().to(lm.device)
        if skip_first:
            keep[:, 0] = False
        for s in site_list:
            rows[s].append(acts[s][keep].to("cpu", dtype))
        if progress:
            progress.advance(task, int(keep.sum()))
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(0))  # undo the length sort
    out = {s: torch.cat(r)[perm] for s, r in rows.items()}
    return out[site_list[0]] if single else out
