"""SAEs in SAELens format: load (directory or pretrained release), save, evaluate, wrap as feature units."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kscope.errors import KscopeError
from kscope.io import atomic_dir
from kscope.model.loading import hub_reachable
from kscope.model.sites import Site, check_layer, site_dim
from kscope.units.base import FeatureUnits


def load_sae(source: str, device: str = "cpu", sae_id: str | None = None):
    """A SAELens SAE from a directory (``cfg.json`` + ``sae_weights.safetensors``) or, given
    ``sae_id``, from a SAELens pretrained release name (needs the hub)."""
    from sae_lens import SAE

    p = Path(source)
    if p.is_dir():
        if not (p / "cfg.json").exists():
            raise KscopeError(f"{p} is not a SAELens SAE directory (no cfg.json)")
        if not any(p.glob("*.safetensors")):
            raise KscopeError(f"SAE {p} has no weights (no .safetensors file)")
        try:
            sae = SAE.load_from_disk(p, device=device)
        except Exception as e:  # noqa: BLE001 - bad JSON, truncated or mismatched tensors, unknown architecture...
            msg = str(e).splitlines()[0] if str(e) else ""
            raise KscopeError(f"cannot load SAE {p}: {type(e).__name__}: {msg[:200]}") from None
        return check_sae_weights(sae, str(next(p.glob("*.safetensors"))))
    if sae_id is None:
        raise KscopeError(f"SAE {source!r} is not a directory; for a pretrained release also give --sae-id")
    try:
        with _offline_unless_reachable():
            sae = SAE.from_pretrained(source, sae_id, device=device)
    except Exception as e:  # noqa: BLE001 - the hub or the release table can fail many ways
        raise KscopeError(f"cannot load pretrained SAE {source}/{sae_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return check_sae_weights(sae, f"{source}/{sae_id}")


def check_sae_weights(sae, where: str):
    """``sae``, unless a tensor of it has the wrong shape for its ``d_in`` x ``d_sae``, is not a float or holds NaN or
    infinity: refused in one line naming ``where`` (its file) and the tensor."""
    from kscope.numerics import unsound_tensor

    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    tensors = sae.state_dict()
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in want.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise KscopeError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, not {shape} (d_in {d_in}, "
                              f"d_sae {d_sae})")
    bad = unsound_tensor(tensors)
    if bad:
        raise KscopeError(f"{where}: {bad[1]}; the SAE is broken (retrain it, or remove it from the cache)")
    return sae


@contextmanager
def _offline_unless_reachable():
    """Hugging Face downloads from the local cache only while the hub does not answer (instead of ~30 s of retries)."""
    import huggingface_hub.constants as hub

    old = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = old or not hub_reachable()
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old


def check_release(release: str, flag: str = "--sae-release") -> None:
    """Refuse, before any work, a SAELens release it does not know, or one neither in the local Hugging Face cache nor
    reachable (the hub is probed for 3 s, as for ``--model`` hub ids)."""
    import huggingface_hub.constants as hub
    from huggingface_hub.file_download import repo_folder_name
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    known = get_pretrained_saes_directory()
    if release not in known:
        raise KscopeError(f"{flag} {release!r} is not a SAELens pretrained release (e.g. gemma-scope-2b-pt-res-canonical)")
    cached = (Path(hub.HF_HUB_CACHE) / repo_folder_name(repo_id=known[release].repo_id, repo_type="model") / "snapshots").is_dir()
    if not cached and not hub_reachable():
        raise KscopeError(f"{flag} {release}: not in the Hugging Face cache, and the hub is unreachable")

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

def sae_site_on_disk(path: str) -> Site | None:
    """The site an SAE directory says it was trained on (its ``cfg.json``'s hook name), without loading it; None if unsaid."""
    try:
        meta = json.loads((Path(path) / "cfg.json").read_text(encoding="utf-8")).get("metadata") or {}
        return Site.parse(meta["hook_name"]) if meta.get("hook_name") else None
    except (OSError, ValueError, KscopeError, AttributeError):
        return None


def feature_units(model, sae, site: Site | None = None) -> FeatureUnits:
    site = sae_site(sae, site)
    check_layer(model, site.layer)
    d = site_dim(model, site)
    if int(sae.cfg.d_in) != d:
        raise KscopeError(f"SAE d_in={sae.cfg.d_in} does not match {site.name} width {d}")
    return FeatureUnits(site, sae)


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

def save_sae(sae, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``sae`` in SAELens format to ``out_dir`` atomically (plus ``kscope.json`` with ``extra``)."""
    with atomic_dir(out_dir) as tmp:
        sae.save_model(tmp)
        if extra is not None:
            (tmp / "kscope.json").write_text(json.dumps(extra, indent=2))
    return Path(out_dir)
