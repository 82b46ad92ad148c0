"""Inject private facts by a short fine-tune (loss on the secret's tokens only), save to a new directory."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch

from kscope.errors import KscopeError
from kscope.facts import Fact, resolve_targets
from kscope.io import atomic_dir, read_json
from kscope.privacy_data import PrivacyConfig, injection_sentences
from kscope.scoring import pad_rows

MANIFEST = "kscope_privacy.json"


def _batch(tokenizer, pairs: Sequence[tuple[str, str]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``ids``, ``mask`` and ``labels`` (-100 except on the answer tokens)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=True).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    ids, mask = pad_rows(rows, tokenizer.pad_token_id or 0)
    lab, _ = pad_rows(labels, -100)
    return ids.to(device), mask.to(device), lab.to(device)


def finetune(lm, facts: Sequence[Fact], cfg: PrivacyConfig, progress=None) -> list[float]:
    """Fine-tune ``lm.model`` in place on the injection sentences; returns the loss per epoch."""
    pairs = injection_sentences(list(facts))
    model = lm.model
    model.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    losses = []
    steps_per_epoch = (len(pairs) + cfg.batch_size - 1) // cfg.batch_size
    task = progress.add_task("injecting", total=cfg.epochs * steps_per_epoch) if progress else None
    for _ in range(cfg.epochs):
        rng.shuffle(pairs)
        total = 0.0
        for i in range(0, len(pairs), cfg.batch_size):
            ids, mask, lab = _batch(lm.tokenizer, pairs[i : i + cfg.batch_size], lm.device)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            if progress:
                progress.advance(task)
        losses.append(total / steps_per_epoch)
    model.eval()
    model.requires_grad_(False)
    return losses


@torch.no_grad()
def greedy_matches(lm, prompts: Sequence[str], answer: str, batch_size: int = 32) -> list[bool]:
    """Does greedy decoding after each prompt reproduce ``" " + answer`` exactly?

    Checked by teacher forcing in one batched forward: greedy reproduces the answer iff at every
    answer position the argmax is the answer's token given the answer's own prefix.
    """
    target = lm.tokenizer(" " + answer, add_special_tokens=False).input_ids
    if not prompts:
        return []
    out: list[bool] = []
    pad = lm.tokenizer.pad_token_id or 0
    for s in range(0, len(prompts), batch_size):
        rows = [lm.tokenizer(p, add_special_tokens=True).input_ids for p in prompts[s : s + batch_size]]
        ids, mask = pad_rows([r + target for r in rows], pad)
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits
        for i, r in enumerate(rows):
            pred = logits[i, len(r) - 1 : len(r) - 1 + len(target)].argmax(-1).tolist()
            out.append(pred == target)
    return out


def memorised(lm, facts: Sequence[Fact]) -> list[dict]:
    """Per fact: first-token top-1 and exact greedy match, on edit and held-out prompts."""
    from kscope.scoring import answer_probs

    facts = resolve_targets(list(facts), lm.tokenizer, "first")
    rows = []
    for f in facts:
        _, r_edit = answer_probs(lm.model, lm.tokenizer, f.prompts, [f.target_id] * len(f.prompts))
        _, r_held = answer_probs(lm.model, lm.tokenizer, f.heldout_prompts, [f.target_id] * len(f.heldout_prompts))
        rows.append({
            "uid": f.uid,
            "top1_edit": float((r_edit == 0).float().mean()),
            "top1_heldout": float((r_held == 0).float().mean()) if len(r_held) else None,
            "exact_edit": float(sum(greedy_matches(lm, f.prompts, f.object)) / len(f.prompts)),
        })
    return rows


def check_new_dir(out_dir: str | Path) -> Path:
    """``out_dir`` if it is absent or empty; the privacy jobs never overwrite a directory."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise KscopeError(f"{out} exists and is not empty; give a new directory (inputs are never overwritten)")
    return out


def save_model_dir(lm, out_dir: str | Path, manifest: dict) -> Path:
    """Write model + tokenizer + manifest to a *new* directory, atomically."""
    out = check_new_dir(out_dir)
    with atomic_dir(out) as tmp:  # replaces only an empty directory
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def read_manifest(model_dir: str | Path) -> dict:
    p = Path(model_dir) / MANIFEST
    if not p.exists():
        raise KscopeError(f"{model_dir} is not a kscope privacy model (no {MANIFEST}); run `kscope privacy build` first")
    return read_json(p)


def facts_from_manifest(manifest: dict) -> list[Fact]:
    return [Fact(d["subject"], d["relation"], d["object"], d["prompts"], heldout_prompts=d["heldout_prompts"], uid=d["uid"])
            for d in manifest["facts"]]
