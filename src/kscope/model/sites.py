"""Named hook points ("sites") of a decoder-only HF model, and where they live.

A site is ``(layer, kind)``:

- ``mlp.neurons``: the MLP hidden activation that enters the down projection,
  shape ``[batch, seq, d_mlp]``. For gated MLPs (LLaMA, Qwen, Gemma) that is
  ``act(gate(x)) * up(x)``, read as the *input* of ``down_proj``.
- ``mlp.pre``: the pre-activation, the output of the projection that feeds the nonlinearity
  (GPT-2 ``c_fc``, gated ``gate_proj``), ``[batch, seq, d_mlp]``. This is what the EleutherAI
  ``knowledge-neurons`` library attributes; kscope's default neurons are ``mlp.neurons``.
- ``mlp.out``: the MLP block's output, ``[batch, seq, d_model]``.
- ``resid.post``: the residual stream after the whole block, ``[batch, seq, d_model]``.

Only this module knows module paths of model families.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kscope.errors import KscopeError

SiteKind = Literal["mlp.neurons", "mlp.pre", "mlp.out", "resid.post"]
SITE_KINDS: tuple[str, ...] = ("mlp.neurons", "mlp.pre", "mlp.out", "resid.post")

# TransformerLens / SAELens hook names for each kind, so SAEs trained elsewhere map onto sites.
_TL_HOOKS = {"mlp.neurons": "mlp.hook_post", "mlp.pre": "mlp.hook_pre", "mlp.out": "hook_mlp_out", "resid.post": "hook_resid_post"}

_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_DOWN_PROJ_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_UP_PROJ_NAMES = ("gate_proj", "c_fc", "dense_h_to_4h", "fc1", "fc_in", "w1")


@dataclass(frozen=True, order=True)
class Site:
    """A hook point: ``layer`` index and ``kind`` (one of ``SITE_KINDS``)."""

    layer: int
    kind: str = "mlp.out"

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise KscopeError(f"unknown site kind {self.kind!r}; choose one of {', '.join(SITE_KINDS)}")
        if self.layer < 0:
            raise KscopeError(f"layer must be >= 0, got {self.layer}")

    @property
    def name(self) -> str:
        return f"{self.layer}/{self.kind}"

    @property
    def hook_name(self) -> str:
        """The TransformerLens/SAELens name of this site (``blocks.L.hook_mlp_out``...)."""
        return f"blocks.{self.layer}.{_TL_HOOKS[self.kind]}"

    @classmethod
    def parse(cls, text: str) -> "Site":
        """Parse ``"12/mlp.out"`` or a SAELens hook name like ``"blocks.12.hook_resid_post"``."""
        m = re.fullmatch(r"(\d+)/([\w.]+)", text.strip())
        if m:
            return cls(int(m.group(1)), m.group(2))
        m = re.fullmatch(r"blocks\.(\d+)\.([\w.]+)", text.strip())
        if m:
            for kind, tl in _TL_HOOKS.items():
                if m.group(2) == tl:
                    return cls(int(m.group(1)), kind)
        raise KscopeError(f"cannot parse site {text!r}; use LAYER/KIND, e.g. 3/mlp.out, or blocks.3.hook_mlp_out")


def _get_path(obj: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise KscopeError(f"unsupported model architecture {type(model).__name__}: no block list at {', '.join(_LAYER_PATHS)}")


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def check_layer(model: nn.Module, layer: int) -> None:
    n = n_layers(model)
    if not 0 <= layer < n:
        raise KscopeError(f"unknown layer {layer}: the model has layers 0..{n - 1}")


def _child(parent: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        mod = getattr(parent, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise KscopeError(f"no {what} found in {type(parent).__name__} (looked for {', '.join(names)})")


def mlp_module(model: nn.Module, layer: int) -> nn.Module:
    check_layer(model, layer)
    return _child(decoder_layers(model)[layer], _MLP_NAMES, "MLP module")


def down_proj(model: nn.Module, layer: int) -> nn.Module:
    """The MLP's output projection (``down_proj`` / GPT-2 ``c_proj`` ...)."""
    return _child(mlp_module(model, layer), _DOWN_PROJ_NAMES, "down projection")


def pre_proj(model: nn.Module, layer: int) -> nn.Module:
    """The projection whose output enters the MLP nonlinearity (``c_fc`` / ``gate_proj`` ...)."""
    return _child(mlp_module(model, layer), _UP_PROJ_NAMES, "MLP input projection")


def down_proj_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """Down-projection weight as ``[d_model, d_mlp]`` (a view: writes go to the model)."""
    mod = down_proj(model, layer)
    w = mod.weight
    if type(mod).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return w.data.T
    return w.data


def site_module(model: nn.Module, site: Site) -> tuple[nn.Module, str]:
    """The module to hook for ``site`` and whether to hook its input ("pre") or output ("out")."""
    check_layer(model, site.layer)
    if site.kind == "mlp.neurons":
        return down_proj(model, site.layer), "pre"
    if site.kind == "mlp.pre":
        return pre_proj(model, site.layer), "out"
    if site.kind == "mlp.out":
        return mlp_module(model, site.layer), "out"
    return decoder_layers(model)[site.layer], "out"


def site_dim(model: nn.Module, site: Site) -> int:
    """Width of the activation at ``site``."""
    if site.kind in ("mlp.neurons", "mlp.pre"):
        return down_proj_weight(model, site.layer).shape[1]
    return down_proj_weight(model, site.layer).shape[0]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the LM head (LLaMA ``model.norm``, GPT-2 ``transformer.ln_f`` ...)."""
    return _child(model.base_model, ("norm", "ln_f", "final_layer_norm", "final_layernorm"), "final norm")


def config_shape(config) -> tuple[int, int, int]:
    """``(layers, d_model, d_mlp)`` from a model's config alone (no weights loaded), for checks before any model work."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or (4 * d_model if d_model else None)
    if not (layers and d_model and d_mlp):
        raise KscopeError(f"cannot tell the layer count and widths of a {type(config).__name__}")
    return int(layers), int(d_model), int(d_mlp)
