import pytest
import torch

from kscope.errors import KscopeError
from kscope.model.hooks import hooked, site_activations
from kscope.model.sites import SITE_KINDS, Site, down_proj_weight, site_dim
from kscope.units.base import NeuronUnits, suppress


def _ids(lm, text="the capital of france is"):
    return lm.tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_hooks_leave_logits_unchanged(lm, kind):
    ids = _ids(lm)
    clean = lm.model(ids).logits
    site = Site(1, kind)
    with hooked(lm.model, {site: lambda x: x}, capture=[site]) as cap:
        hooked_logits = lm.model(ids).logits
    assert torch.equal(clean, hooked_logits)
    assert cap[site].shape == (1, ids.shape[1], site_dim(lm.model, site))


def test_neuron_site_is_down_proj_input(llama_lm):
    """For gated MLPs the neurons are act(gate)*up, not gate_proj's output."""
    m = llama_lm.model
    ids = _ids(llama_lm)
    site = Site(0, "mlp.neurons")
    mlp = m.model.layers[0].mlp
    grabbed = {}
    h = mlp.gate_proj.register_forward_hook(lambda mod, i, o: grabbed.update(x=i[0]))
    with hooked(m, capture=[site]) as cap:
        m(ids)
    h.remove()
    x = grabbed["x"]
    expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert torch.allclose(cap[site], expected, atol=1e-6)
    assert not torch.allclose(cap[site], mlp.gate_proj(x))
    # And the MLP output is exactly down_proj of it.
    assert torch.allclose(cap[site] @ down_proj_weight(m, 0).T, mlp(x), atol=1e-5)


def test_suppress_changes_and_exit_restores_exactly(lm):
    ids = _ids(lm)
    clean = lm.model(ids).logits
    site = Site(1, "mlp.neurons")
    units = NeuronUnits(site, site_dim(lm.model, site))
    with hooked(lm.model, {site: units.edit_fn(suppress(list(range(16))))}):
        edited = lm.model(ids).logits
    assert not torch.allclose(edited, clean)
    assert torch.equal(lm.model(ids).logits, clean)


def test_hook_removed_even_on_error(lm):
    ids = _ids(lm)
    clean = lm.model(ids).logits
    site = Site(0, "mlp.out")
    with pytest.raises(RuntimeError):
        with hooked(lm.model, {site: lambda x: x * 0}):
            raise RuntimeError("boom")
    assert torch.equal(lm.model(ids).logits, clean)


def test_site_activations_match_full_forward(lm):
    ids = _ids(lm)
    site = Site(1, "resid.post")
    with hooked(lm.model, capture=[site]) as cap:
        lm.model(ids)
    early = site_activations(lm.model, [site], ids)[site]
    assert torch.allclose(early, cap[site])


def test_unknown_layer_and_kind_are_clear_errors(lm):
    with pytest.raises(KscopeError, match="unknown layer 7"):
        with hooked(lm.model, capture=[Site(7, "mlp.out")]):
            pass
    with pytest.raises(KscopeError, match="unknown site kind"):
        Site(0, "attn.out")
    assert Site.parse("blocks.2.hook_resid_post") == Site(2, "resid.post")
    assert Site.parse("3/mlp.neurons") == Site(3, "mlp.neurons")
    with pytest.raises(KscopeError):
        Site.parse("layer three")


def _forwards(lm):
    """Plain, padded-batch and KV-cached forwards, as the privacy observer makes them."""
    from kscope.model.prefix import continuation_nlls

    ids = _ids(lm)
    rows = [lm.tokenizer(t).input_ids for t in ("the capital of france is paris", "the capital of france is rome",
                                                  "the capital of france is a city")]
    return lm.model(ids).logits, torch.tensor(continuation_nlls(lm.model, ids.shape[1], rows))


def test_block_replay_repeats_forwards_from_a_middle_block(lm):
    from kscope.model.hooks import BlockReplay, ReplayMismatch

    replay = BlockReplay(lm.model, 1)
    with replay.recording():
        logits, nlls = _forwards(lm)
    n_layers = lm.model.config.num_hidden_layers
    with replay.replaying():
        assert lm.model.config.num_hidden_layers == n_layers - 1
        r_logits, r_nlls = _forwards(lm)
    assert lm.model.config.num_hidden_layers == n_layers and len(replay.states) > 1
    assert torch.allclose(r_logits, logits, atol=1e-5) and torch.allclose(r_nlls, nlls, atol=1e-5)
    # An edit at or above the start block acts as in a full forward; the recorded states stay the unedited ones.
    edit = {Site(1, "mlp.out"): lambda x: 3 * x}
    with hooked(lm.model, edit):
        e_logits, e_nlls = _forwards(lm)
        with replay.replaying():
            re_logits, re_nlls = _forwards(lm)
    assert not torch.allclose(e_logits, logits, atol=1e-3)
    assert torch.allclose(re_logits, e_logits, atol=1e-5) and torch.allclose(re_nlls, e_nlls, atol=1e-5)
    # Forwards that differ from the recording are refused, and the model is whole again afterwards.
    with pytest.raises(ReplayMismatch), replay.replaying():
        lm.model(_ids(lm, "paris"))
    assert torch.allclose(lm.model(_ids(lm)).logits, logits, atol=1e-6)
