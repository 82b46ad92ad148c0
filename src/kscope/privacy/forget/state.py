"""What a forgotten model carries for the next request: per edited layer, the second moment of the erased records'
keys (``K Kᵀ / n``, no prompt, secret or token). The next ``kscope forget`` on the saved model preserves these keys as
one more group, so a later edit keeps the earlier erasures (AlphaEdit's preservation of earlier edits,
``AlphaEdit/AlphaEdit_main.py``'s accumulated ``cache_c``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kscope.model.sites import Site
from kscope.privacy.edit.keyed import KeyRows, at_keys

STATE = "forget-state.safetensors"


@dataclass
class ForgetState:
    """Per layer the mean second moment of every erased key so far, and how many keys that is."""

    moments: dict[int, torch.Tensor]
    n_keys: int

    def add(self, lm, rows: KeyRows, layers) -> "ForgetState":
        """This state with ``rows``' keys (on the model as it is now) added."""
        got = at_keys(lm, rows, [Site(L, "mlp.neurons") for L in layers])
        n_new = int(rows.keys.sum())
        total = self.n_keys + n_new
        out = {}
        for s, k in got.items():
            k = k.double().cpu()
            prior = self.moments.get(s.layer)
            summed = k.T @ k + (prior * self.n_keys if prior is not None else 0)
            out[s.layer] = summed / max(total, 1)
        return ForgetState(out, total)

    def save(self, model_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        p = Path(model_dir) / STATE
        save_file({f"moment.{L}": m.contiguous() for L, m in self.moments.items()}, str(p), metadata={"n_keys": str(self.n_keys)})
        return p


def load_state(model_dir: str | Path | None) -> ForgetState | None:
    """The state a model directory carries from an earlier ``kscope forget``, if any."""
    p = Path(model_dir) / STATE if model_dir else None
    if p is None or not p.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        n = int((f.metadata() or {}).get("n_keys", 0))
        return ForgetState({int(k.split(".")[1]): f.get_tensor(k) for k in f.keys()}, n)
