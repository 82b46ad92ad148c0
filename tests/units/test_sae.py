import pytest
import torch

from kscope.errors import KscopeError
from kscope.model.hooks import hooked
from kscope.units.provision import train_sae
from kscope.units.sae import feature_units, load_sae, sae_site, sae_stats, save_sae
from kscope.units.training import TrainSAEConfig
from kscope.model.sites import Site
from kscope.units.base import FeatureUnits, suppress

TEXTS = ["the capital of france is paris", "people in spain speak spanish", "the capital of germany is berlin",
         "the eiffel tower is in paris", "the official language of italy is italian"] * 8


@pytest.fixture
def trained(llama_lm):
    site = Site(1, "mlp.out")
    cfg = TrainSAEConfig(expansion=2, k=8, batch_tokens=32, epochs=60, lr=3e-3, max_tokens=2000, generate=0)
    sae, stats = train_sae(llama_lm, site, cfg, TEXTS, "cpu")
    return sae, stats, site


def test_sae_stats_pure():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    u = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    s = sae_stats(x, x.clone(), u)
    assert s.mse == 0 and s.explained_variance == 1.0
    assert s.l0 == pytest.approx(4 / 3)
    assert s.dead_fraction == pytest.approx(1 / 3)
    mean = sae_stats(x, x.mean(0, keepdim=True).expand_as(x), u)
    assert mean.explained_variance == pytest.approx(0.0, abs=1e-6)


def test_train_save_load_round_trip(trained, tmp_path, llama_lm):
    sae, stats, site = trained
    assert stats["l0"] <= 8 + 1e-6
    assert stats["explained_variance"] > 0.3
    out = save_sae(sae, tmp_path / "sae", {"site": site.name})
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    back = load_sae(str(out))
    assert sae_site(back) == site
    x = torch.randn(5, sae.cfg.d_in)
    assert torch.allclose(back.encode(x), sae.encode(x))
    assert torch.allclose(back.decode(back.encode(x)), sae.decode(sae.encode(x)))
    assert feature_units(llama_lm.model, back).site == site


def test_feature_splice_keeps_output_and_edits_change_it(trained, llama_lm):
    sae, _, site = trained
    units = FeatureUnits(site, sae)
    ids = llama_lm.tokenizer("the capital of france is", return_tensors="pt").input_ids
    clean = llama_lm.model(ids).logits
    with hooked(llama_lm.model, {site: units.edit_fn(lambda u: u)}):
        spliced = llama_lm.model(ids).logits
    assert torch.allclose(spliced, clean, atol=1e-5)
    with hooked(llama_lm.model, {site: units.edit_fn(suppress(list(range(units.n_units))))}):
        edited = llama_lm.model(ids).logits
    assert not torch.allclose(edited, clean, atol=1e-4)
    assert torch.equal(llama_lm.model(ids).logits, clean)


def test_sae_errors(tmp_path, llama_lm, trained):
    with pytest.raises(KscopeError, match="not a SAELens SAE directory"):
        load_sae(str(tmp_path))
    with pytest.raises(KscopeError, match="--sae-id"):
        load_sae("gemma-scope-2b-pt-res")
    sae, _, _ = trained
    sae.cfg.metadata.hook_name = "blocks.1.mlp.hook_post"  # claims the 64-wide neuron site
    with pytest.raises(KscopeError, match="does not match"):
        feature_units(llama_lm.model, sae)
    sae.cfg.metadata.hook_name = "blocks.9.hook_mlp_out"
    with pytest.raises(KscopeError, match="unknown layer 9"):
        feature_units(llama_lm.model, sae)
