"""Inject private facts by a short fine-tune (loss on the secret's tokens only) and train the retain twin (the same
fine-tune without the forget set), save both to a new directory."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from kscope.config import Config, nested, option
from kscope.errors import KscopeError
from kscope.facts import Fact, resolve_targets
from kscope.io import atomic_dir, check_writable
from kscope.model.head import plain_head
from kscope.model.loading import ModelConfig, load_model
from kscope.model.readout import pad_rows
from kscope.model.sites import mlp_module, n_layers
from kscope.privacy.data.dataset import PrivacyConfig, build_private_facts
from kscope.privacy.data.splits import PeopleSplit, split_people
from kscope.progress import make_progress
from kscope.results import Result

MANIFEST = "kscope_privacy.json"
RETAIN = "retain"  # the retain twin's subdirectory of a privacy model


def answer_batch(tokenizer, pairs: Sequence[tuple[str, str]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``model(labels=labels).loss`` (mean cross-entropy over the tokens not labelled -100, each predicted from the one
    before), with the LM head run only at the positions that predict an answer token when the head is a plain linear
    map: a short answer after a longer prompt leaves most of a batch's head products unneeded."""
    head = plain_head(model)
    if head is None:
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
    tgt = labels[:, 1:]
    scored = tgt != -100
    return torch.nn.functional.cross_entropy(head(h[scored]).float(), tgt[scored])


def adamw(params: Sequence[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay, with torch's fused kernel on CPU and CUDA: one pass over the weights per step instead of
    one per operation (SmolLM2, all weights, 2 cores: 0.08 s a step against 0.38)."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=params[0].device.type in ("cpu", "cuda"))


def _trainable(model, which: str, band: Sequence[int] = ()) -> list[torch.nn.Parameter]:
    """All weights, every MLP's (``which="mlp"``), or the MLPs of the ``band`` layers (``which="band"``)."""
    if which == "all":
        return list(model.parameters())
    layers = range(n_layers(model)) if which == "mlp" else band
    params = [p for L in layers for p in mlp_module(model, L).parameters()]
    if not params:
        raise KscopeError("no MLP weights found to fine-tune")
    return params


def finetune(lm, facts: Sequence[Fact], cfg: PrivacyConfig, progress=None, skip: frozenset[str] = frozenset(),
             epochs: int | None = None, label: str = "injecting") -> list[float]:
    """Fine-tune ``lm.model`` in place on the injection sentences; returns the loss per epoch run.

    With ``cfg.early_stop``, training ends after the first epoch at which greedy decoding reproduces
    every secret on every edit prompt. ``skip``: uids of facts whose sentences are left out (the retain twin's forget
    set); the shuffle still runs over every sentence, so the others keep the order they have in the full fine-tune.
    ``epochs``: run exactly this many (no early stop).
    """
    tagged = [(f.uid, p, " " + f.object) for f in facts for p in f.prompts]
    n_epochs = cfg.epochs if epochs is None else epochs
    early = cfg.early_stop and epochs is None
    model = lm.model
    plain_head(model)  # its one-time check runs in eval mode, outside the training steps
    params = _trainable(model, cfg.train, cfg.band)
    model.train()
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = adamw(params, cfg.lr)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    losses = []
    checks = [(p, f.object) for f in facts for p in f.prompts]
    probe = sorted(random.Random(cfg.seed).sample(range(len(checks)), min(PROBE, len(checks))))
    n_pairs = sum(uid not in skip for uid, _, _ in tagged)
    steps_per_epoch = (n_pairs + cfg.batch_size - 1) // cfg.batch_size
    task = progress.add_task(label, total=n_epochs * steps_per_epoch) if progress else None
    try:
        for _ in range(n_epochs):
            rng.shuffle(tagged)
            pairs = [(p, a) for uid, p, a in tagged if uid not in skip]
            total = 0.0
            for i in range(0, len(pairs), cfg.batch_size):
                ids, mask, lab = answer_batch(lm.tokenizer, pairs[i : i + cfg.batch_size], lm.device)
                loss = answer_loss(model, ids, mask, lab)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
                if progress:
                    progress.advance(task)
            losses.append(total / steps_per_epoch)
            if early:
                model.eval()
                done = all_produced(lm, checks, probe)
                model.train()
                if done:
                    if progress:
                        progress.update(task, completed=n_epochs * steps_per_epoch)
                    break
    finally:
        model.eval()
        model.requires_grad_(False)
    return losses


PROBE = 16  # rows the early-stop check tries first


def all_produced(lm, pairs: Sequence[tuple[str, str]], probe: Sequence[int] = ()) -> bool:
    """Whether greedy decoding produces every pair's answer (``teacher_forced``, one batched pass). The ``probe`` rows
    run first: while any of them misses, the full pass is skipped (most epochs of an injection); else the answer is the
    full pass's, as without a probe."""
    if probe and not all(ok for ok, _ in teacher_forced(lm, [pairs[i] for i in probe])):
        return False
    return all(ok for ok, _ in teacher_forced(lm, pairs))


def teacher_forced(lm, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[tuple[bool, float]]:
    """For each ``(prompt, answer)``: does greedy decoding after the prompt reproduce ``" " + answer``
    exactly, and the answer's log-probability ``sum log P(a_t | prompt, a_<t)``.

    One batched teacher-forced forward: greedy reproduces the answer iff at every answer position
    the argmax is the answer's token given the answer's own prefix.
    """
    return [(all(hits), lp) for hits, lp in forced_tokens(lm, pairs, batch_size)]


@torch.no_grad()
def forced_tokens(lm, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[tuple[list[bool], float]]:
    """For each ``(prompt, answer)``, teacher-forced: per answer token, is it the argmax given the answer's own prefix,
    and the answer's log-probability (``teacher_forced`` reads its ``all``)."""
    tok = lm.tokenizer
    rows = [(tok(p, add_special_tokens=True).input_ids, tok(" " + a, add_special_tokens=False).input_ids) for p, a in pairs]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out: list[tuple[list[bool], float]] = [([], 0.0)] * len(rows)
    pad = tok.pad_token_id or 0
    from kscope.model.readout import logits_per_row

    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = pad_rows([rows[i][0] + rows[i][1] for i in idx], pad)
        at = [[len(rows[i][0]) - 1 + t for t in range(len(rows[i][1]))] for i in idx]  # the positions predicting the answer
        for i, z in zip(idx, logits_per_row(lm.model, ids.to(lm.device), mask.to(lm.device), at)):
            tgt = torch.tensor(rows[i][1], device=z.device)
            out[i] = ((z.argmax(-1) == tgt).tolist(), float(z.log_softmax(-1).gather(1, tgt[:, None]).sum()))
    return out


def greedy_matches(lm, prompts: Sequence[str], answer: str, batch_size: int = 32) -> list[bool]:
    """Does greedy decoding after each prompt reproduce ``" " + answer`` exactly?"""
    return [ok for ok, _ in teacher_forced(lm, [(p, answer) for p in prompts], batch_size)]


@dataclass
class Memorised:
    """A private fact after injection: first-token top-1 rate (edit / held-out prompts), exact greedy match rate (edit)."""

    uid: str
    top1_edit: float
    top1_heldout: float | None
    exact_edit: float


def memorised(lm, facts: Sequence[Fact]) -> list[Memorised]:
    """Per fact: first-token top-1 and exact greedy match, on edit and held-out prompts."""
    from kscope.model.readout import answer_probs

    facts = resolve_targets(list(facts), lm.tokenizer, "first")
    rows = []
    for f in facts:
        _, r_edit = answer_probs(lm.model, lm.tokenizer, f.prompts, [f.target_id] * len(f.prompts))
        _, r_held = answer_probs(lm.model, lm.tokenizer, f.heldout_prompts, [f.target_id] * len(f.heldout_prompts))
        rows.append(Memorised(f.uid, float((r_edit == 0).float().mean()),
                              float((r_held == 0).float().mean()) if len(r_held) else None,
                              float(sum(greedy_matches(lm, f.prompts, f.object)) / len(f.prompts))))
    return rows


@dataclass
class BuildSummary:
    n_facts: int
    memorised_top1: int
    memorised_exact: int
    losses: list[float]
    seconds: float
    epochs_run: int = 0


@dataclass
class PrivacyManifest(Result):
    """What ``privacy build`` made: the base model, the options, the private facts and how well each was memorised, the
    people's roles (``split``) and the retain twin's summary and memorisation (in ``RETAIN/``)."""

    kind = "privacy-model"
    version = 2

    base_model: str
    config: dict
    facts: list[dict]
    memorised: list[Memorised]
    summary: BuildSummary
    split: PeopleSplit | None = None
    retain: BuildSummary | None = None
    retain_memorised: list[Memorised] | None = None

    def private_facts(self) -> list[Fact]:
        return [Fact(d["subject"], d["relation"], d["object"], d["prompts"], heldout_prompts=d["heldout_prompts"], uid=d["uid"])
                for d in self.facts]


def check_new_dir(out_dir: str | Path | None) -> Path:
    """``out_dir`` if it is absent or an empty directory; the privacy jobs never overwrite anything."""
    if not out_dir:
        raise KscopeError("--out is required")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KscopeError(f"{out} exists and is a file; give a new directory")
    if out.exists() and any(out.iterdir()):
        raise KscopeError(f"{out} exists and is not empty; give a new directory (inputs are never overwritten)")
    return out


def save_model_dir(lm, out_dir: str | Path, manifest: PrivacyManifest, twin=None) -> Path:
    """Write model + tokenizer + manifest (and the retain ``twin`` into ``RETAIN/``) to a *new* directory, atomically."""
    out = check_new_dir(out_dir)
    with atomic_dir(out) as tmp:  # replaces only an empty directory
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        if twin is not None:
            twin.model.save_pretrained(tmp / RETAIN)
            twin.tokenizer.save_pretrained(tmp / RETAIN)
        manifest.save(tmp / MANIFEST)
    return out


def retain_dir(model_dir: str | Path, manifest: PrivacyManifest) -> Path | None:
    """The retain twin's directory of a privacy model, if it was built with one."""
    return Path(model_dir) / RETAIN if manifest.retain is not None else None


def read_manifest(model_dir: str | Path) -> PrivacyManifest:
    p = Path(model_dir) / MANIFEST
    if not Path(model_dir).is_dir() or not p.exists():
        raise KscopeError(f"{model_dir} is not a kscope privacy model (no {MANIFEST}); run `kscope privacy build` first")
    return PrivacyManifest.load(p)


@dataclass
class BuildConfig(Config):
    """Make PrivacyParaRel, inject it by a short fine-tune, save the model + manifest to a new directory."""

    model: ModelConfig = nested(ModelConfig)
    privacy: PrivacyConfig = nested(PrivacyConfig)
    out: str | None = option(help="New directory for the fine-tuned model (never an existing one).", required=True, output="dir")


def build(cfg: BuildConfig) -> PrivacyManifest:
    """Make the private facts, fine-tune them into the model, save to ``cfg.out`` with a manifest."""
    check_new_dir(cfg.out)  # before the fine-tune, not after it
    check_writable(cfg.out, cfg.reads(), directory=True, writes=["."], flag="--out")
    facts = build_private_facts(cfg.privacy)
    split = split_people(list(dict.fromkeys(f.subject for f in facts)), cfg.privacy.forget, cfg.privacy.seed)
    t0 = time.time()
    lm = load_model(cfg.model)
    twin = twin_summary = twin_mem = None
    with make_progress() as progress:
        losses = finetune(lm, facts, cfg.privacy, progress)
        mem = memorised(lm, facts)
        summary = _summary(facts, mem, losses, t0)
        if cfg.privacy.retain_twin:  # the same recipe, seed and epochs, without the forget set
            t1 = time.time()
            twin = load_model(cfg.model)
            forget = frozenset(f.uid for f in split.facts(facts, "forget-val", "forget-test"))
            twin_losses = finetune(twin, facts, cfg.privacy, progress, skip=forget, epochs=len(losses), label="retain twin")
            twin_mem = memorised(twin, facts)
            twin_summary = _summary(facts, twin_mem, twin_losses, t1)
    manifest = PrivacyManifest(cfg.model.model, asdict(cfg.privacy), [f.to_dict() for f in facts], mem, summary, split,
                               twin_summary, twin_mem)
    save_model_dir(lm, cfg.out, manifest, twin)
    return manifest


def _summary(facts, mem: list[Memorised], losses: list[float], t0: float) -> BuildSummary:
    return BuildSummary(len(facts), sum(r.top1_edit >= 0.5 for r in mem), sum(r.exact_edit >= 0.5 for r in mem), losses,
                        time.time() - t0, len(losses))
