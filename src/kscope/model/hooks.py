"""All model hooking lives here: read or rewrite a site's activation during a forward pass.

Hooks are registered inside a context manager and always removed on exit, so the model
is restored exactly, even when the body raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from kscope.model.sites import Site, decoder_layers, site_module

EditFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a site activation ``[batch, seq, d]`` to its replacement of the same shape."""


def _make_hook(site: Site, kind: str, edit: EditFn | None, store: dict[Site, torch.Tensor] | None):
    def apply(x: torch.Tensor) -> torch.Tensor:
        if store is not None:
            store[site] = x
        return edit(x) if edit is not None else x

    if kind == "pre":

        def pre_hook(_mod: nn.Module, args: tuple):
            new = apply(args[0])
            return None if edit is None else (new, *args[1:])

        return pre_hook

    def out_hook(_mod: nn.Module, _args: tuple, out):
        if isinstance(out, tuple):
            new = apply(out[0])
            return None if edit is None else (new, *out[1:])
        new = apply(out)
        return None if edit is None else new

    return out_hook


@contextmanager
def hooked(
    model: nn.Module,
    edits: Mapping[Site, EditFn] | None = None,
    capture: Iterable[Site] = (),
) -> Iterator[dict[Site, torch.Tensor]]:
    """Run forwards inside with ``edits`` applied and ``capture`` sites recorded.

    Yields a dict that each forward fills with the *incoming* (pre-edit) activation of
    every captured site, ``[batch, seq, d]``, still attached to the autograd graph.
    """
    edits = dict(edits or {})
    captured: dict[Site, torch.Tensor] = {}
    capture = set(capture)
    handles = []
    try:
        for site in sorted(set(edits) | capture):
            module, kind = site_module(model, site)
            hook = _make_hook(site, kind, edits.get(site), captured if site in capture else None)
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(hook))
            else:
                handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def grown_batch(model: nn.Module, new_rows: Mapping[int, int]) -> Iterator[None]:
    """Inside, ``new_rows[l]`` copies of row 0 join the hidden states ``[batch, seq, d]`` at the input of block ``l``.

    Rows that only need to differ from block ``l`` on thus skip the blocks below it, forward and backward.
    The caller supplies a KV cache whose layer ``l`` holds as many rows as reach block ``l``.
    """

    def make(n: int):
        def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict):
            h = args[0] if args else kwargs["hidden_states"]
            h = torch.cat([h, h[:1].expand(n, *h.shape[1:])])
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        return pre_hook

    layers = decoder_layers(model)
    handles = []
    try:
        for layer, n in new_rows.items():
            if n:
                handles.append(layers[layer].register_forward_pre_hook(make(n), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def at_positions(edit: EditFn, positions: torch.Tensor | None) -> EditFn:
    """Apply ``edit`` only at one position per row (``positions``: ``[batch]``); ``None`` = everywhere."""
    if positions is None:
        return edit

    def fn(x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        pos = positions.to(x.device)
        sel = x[rows, pos].unsqueeze(1)  # [batch, 1, d]
        new = edit(sel).squeeze(1)
        out = x.clone()
        out[rows, pos] = new.to(x.dtype)
        return out

    return fn


class _StopForward(Exception):
    pass


@torch.no_grad()
def site_activations(
    model: nn.Module,
    sites: Iterable[Site],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[Site, torch.Tensor]:
    """Activations ``[batch, seq, d]`` of ``sites``; the forward stops after the deepest site."""
    sites = sorted(set(sites))
    deepest = max(s.layer for s in sites)
    out: dict[Site, torch.Tensor] = {}
    stop_module = site_module(model, Site(deepest, "resid.post"))[0]

    def stop(_mod, _args, _out):
        raise _StopForward

    with hooked(model, capture=sites) as cap:
        handle = stop_module.register_forward_hook(stop)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        out = {s: cap[s].detach() for s in sites}
    return out


class ReplayMismatch(RuntimeError):
    """A replayed forward did not match the recorded sequence (count or shape)."""


class BlockReplay:
    """Repeated forwards that start at block ``start``.

    ``recording()``: each forward stores the hidden states entering block ``start``. ``replaying()``: the
    blocks below ``start`` are taken out of the model (their layer indices, the config's layer count
    and layer types follow, so KV caches fit), and the k-th forward's block ``start`` gets the k-th
    stored states. Valid only while nothing below ``start`` changes and the forwards repeat in order
    with the same shapes (a mismatch raises ``ReplayMismatch``); callers check one replay against its
    recording before trusting it.
    """

    def __init__(self, model: nn.Module, start: int):
        self.model, self.start = model, start
        self.states: list[torch.Tensor] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.states = []

        def pre(_mod, args, kwargs):
            self.states.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = decoder_layers(self.model)[self.start].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        layers = decoder_layers(self.model)
        parent, name = next((m, n) for m in self.model.modules() for n, c in m.named_children() if c is layers)
        kept = list(layers)[self.start :]
        indexed = [(m, m.layer_idx) for block in kept for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        cfg = self.model.config
        n_cfg, types = cfg.num_hidden_layers, getattr(cfg, "layer_types", None)
        k = 0

        def pre(_mod, args, kwargs):
            nonlocal k
            h = args[0] if args else kwargs["hidden_states"]
            if k >= len(self.states) or self.states[k].shape != h.shape:
                raise ReplayMismatch(f"forward {k}: nothing recorded of shape {tuple(h.shape)}")
            s = self.states[k].to(h.dtype)
            k += 1
            return ((s, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": s})

        handle = kept[0].register_forward_pre_hook(pre, with_kwargs=True)
        setattr(parent, name, nn.ModuleList(kept))
        for m, i in indexed:
            m.layer_idx = i - self.start
        cfg.num_hidden_layers = n_cfg - self.start
        if isinstance(types, list):
            cfg.layer_types = types[self.start :]
        try:
            yield
            if k != len(self.states):
                raise ReplayMismatch(f"{k} forwards replayed, {len(self.states)} recorded")
        finally:
            handle.remove()
            setattr(parent, name, layers)
            for m, i in indexed:
                m.layer_idx = i
            cfg.num_hidden_layers = n_cfg
            if isinstance(types, list):
                cfg.layer_types = types


@contextmanager
def mlp_output_from(model: nn.Module, layer: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    positions: torch.Tensor | None = None) -> Iterator[None]:
    """Inside, the MLP of ``layer`` outputs ``fn(mlp_input, mlp_output)`` at ``positions`` (bool ``[batch, seq]``; ``None``:
    everywhere), e.g. another model's MLP applied to this model's input, or zeros."""
    from kscope.model.sites import mlp_module

    def hook(_mod, args, out):
        x = args[0]
        new = fn(x, out).to(out.dtype)
        if positions is None:
            return new
        return torch.where(positions.to(out.device)[..., None], new, out)

    handle = mlp_module(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def swapped_weights(model: nn.Module, new: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside, the parameters named in ``new`` (``model.named_parameters()`` names) hold those values; restored exactly."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in new}
    try:
        with torch.no_grad():
            for n, v in new.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
