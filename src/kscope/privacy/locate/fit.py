"""How well each SAE fits the privacy model: explained variance on held-out corpus text and at the secrets' positions,
beside its value on the base model it was trained on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kscope.units.corpus import collect_activations
from kscope.units.training import drop_outliers


@dataclass
class SAEFit:
    """How well a layer's SAE reconstructs this model: explained variance on held-out corpus text and at the
    secrets' positions (the edit prompts' last token and the secret's tokens)."""

    layer: int
    ev_generic: float
    ev_private: float
    ev_generic_source: float | None = None  # on the SAE's own model (base), for comparison
    site: str = "mlp.out"


@torch.no_grad()
def secret_acts(lm, facts, sites) -> dict:
    """Sites' activations at the secrets' positions (each edit prompt's last token and the secret's tokens)."""
    from kscope.model.hooks import site_activations

    out = {s: [] for s in sites}
    for f in facts:
        for p in f.prompts:
            ids = lm.tokenizer(p).input_ids
            ans = lm.tokenizer(" " + f.object, add_special_tokens=False).input_ids
            acts = site_activations(lm.model, sites, torch.tensor([ids + ans[:-1]], device=lm.device))
            for s in sites:
                out[s].append(acts[s][0, len(ids) - 1 :].float().cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def sae_fit(lm, base_lm, units, erase, held_texts, outlier_factor) -> list[SAEFit]:
    """Explained variance of each SAE on this model's activations (held-out corpus text, massive-activation tokens left
    out as in SAE training; and the secrets' positions), beside its value on the base model it was trained on."""
    sites = [u.site for u in units]

    def held(model) -> dict:
        return {s: drop_outliers(a, outlier_factor)[0] for s, a in collect_activations(model, sites, held_texts, 4096).items()}

    gen, src, priv = held(lm), held(base_lm), secret_acts(lm, erase, sites)

    def ev(u, x):
        with torch.no_grad():
            xh = u.decode(u.encode(x.to(lm.device))).float().cpu()
        return float(1 - (x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))

    return [SAEFit(u.site.layer, ev(u, gen[u.site]), ev(u, priv[u.site]), ev(u, src[u.site]), u.site.kind) for u in units]
