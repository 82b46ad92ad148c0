import pytest
import torch

from kscope.errors import KscopeError
from kscope.model.hooks import hooked
from kscope.units.corpus import collect_activations
from kscope.units.training import train_saes
from kscope.units.sae import evaluate_sae, feature_units, load_sae, sae_site, sae_stats, save_sae
from kscope.units.training import TrainSAEConfig
from kscope.model.sites import Site
from kscope.units.base import FeatureUnits, suppress

TEXTS = ["the capital of france is paris", "people in spain speak spanish", "the capital of germany is berlin",
         "the eiffel tower is in paris", "the official language of italy is italian"] * 8


@pytest.fixture
def trained(llama_lm):
    site = Site(1, "mlp.out")
    cfg = TrainSAEConfig(expansion=2, k=8, batch_tokens=32, epochs=60, lr=3e-3, max_tokens=2000)
    acts = collect_activations(llama_lm, site, TEXTS, 2000)
    sae = train_saes({site: acts[20:]}, cfg, "tiny")[site]
    stats = evaluate_sae(sae, acts[:20]).to_dict()
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


def _corpus_file(tmp_path, texts, name="corpus.txt"):
    p = tmp_path / name
    p.write_text("\n\n".join(texts))
    return p


def test_saes_for_several_sites_from_one_pass_are_cached_by_everything_that_shapes_them(llama_lm, tmp_path, facts, monkeypatch):
    """Two sites train together (one activation pass); a second call finds them in the cache; another corpus,
    another k or another model gets other SAEs; no fact prompt is ever in the corpus."""
    from kscope.units import provision
    from kscope.units.corpus import CorpusConfig
    from kscope.units.provision import obtain_saes

    passes = []
    real = provision.collect_activations
    monkeypatch.setattr(provision, "collect_activations", lambda lm, sites, *a, **k: passes.append(list(sites)) or real(lm, sites, *a, **k))
    sites = [Site(1, "mlp.out"), Site(2, "resid.post")]
    tcfg = TrainSAEConfig(expansion=2, k=4, epochs=2, max_tokens=400)
    ccfg = CorpusConfig(generate=0, text_files=[str(_corpus_file(tmp_path, TEXTS))], heldout_frac=0.3)
    got = obtain_saes(llama_lm, sites, tcfg, ccfg, cache_dir=str(tmp_path / "cache"))
    assert passes == [sites, sites]  # one pass for the training texts, one for the held-out texts
    for s in sites:
        sae, info = got[s]
        assert info.source == "trained" and sae_site(sae) == s
        assert info.stats["n_train_tokens"] <= 400 and 0 < info.stats["n_tokens"]
        assert info.corpus["identity"] and "files:" in info.corpus["sources"]
    again = obtain_saes(llama_lm, sites, tcfg, ccfg, cache_dir=str(tmp_path / "cache"))
    assert {s: i.source for s, (_, i) in again.items()} == {s: "cached" for s in sites} and len(passes) == 2
    other_corpus = CorpusConfig(generate=0, text_files=[str(_corpus_file(tmp_path, TEXTS[:30], "b.txt"))], heldout_frac=0.3)
    keys = {got[sites[0]][1].key,
            obtain_saes(llama_lm, sites[:1], tcfg, other_corpus, cache_dir=str(tmp_path / "cache"))[sites[0]][1].key,
            obtain_saes(llama_lm, sites[:1], TrainSAEConfig(expansion=2, k=3, epochs=2, max_tokens=400), ccfg,
                        cache_dir=str(tmp_path / "cache"))[sites[0]][1].key}
    assert len(keys) == 3
    from tests.helpers import tiny_llama, word_tokenizer
    from kscope.model.loading import wrap

    other_model = wrap(tiny_llama(seed=1), word_tokenizer(), name="tiny-llama")  # same name, other weights
    assert obtain_saes(other_model, sites[:1], tcfg, ccfg, cache_dir=str(tmp_path / "cache"))[sites[0]][1].source == "trained"


def test_corpus_split_is_stable_and_disjoint(tmp_path):
    from kscope.units.corpus import Corpus

    texts = [f"text number {i} about history" for i in range(200)]
    c = Corpus(texts, "test", 0.2, 0)
    train, held = c.split()
    assert not set(train) & set(held) and len(train) + len(held) == 200 and 20 < len(held) < 60
    assert Corpus(list(reversed(texts)), "test", 0.2, 0).split()[1] == list(reversed(held))  # by content, not position
    assert c.identity != Corpus(texts[:-1], "test", 0.2, 0).identity != Corpus(texts, "test", 0.2, 1).identity


def test_generated_corpus_extends_a_shorter_cached_one(llama_lm, tmp_path):
    """Batches carry their own seed, so two batches begin with the one sampled before, and only one is sampled again."""
    from kscope.units import corpus

    n = corpus.GEN_BATCH
    calls = []
    real = corpus.generate_texts
    corpus.generate_texts = lambda lm, n, length, seed, start=0, progress=None: calls.append((n, start)) or real(lm, n, length, seed, start)
    try:
        a = corpus.cached_generation(llama_lm, n, 6, 3, cache_dir=str(tmp_path))
        b = corpus.cached_generation(llama_lm, 2 * n, 6, 3, cache_dir=str(tmp_path))
    finally:
        corpus.generate_texts = real
    assert calls == [(n, 0), (n, n)] and b[:n] == a and len(b) == 2 * n
    assert real(llama_lm, n, 6, 3, start=n) == b[n:]  # the same as sampling the second batch on its own


def test_outlier_rule_drops_only_massive_rows():
    from kscope.units.training import outlier_mask

    x = torch.randn(1000, 8)
    x[[3, 500]] *= 1000  # two attention-sink-like rows
    keep = outlier_mask(x, 10.0)
    assert (~keep).nonzero().flatten().tolist() == [3, 500]
    assert outlier_mask(x, 0.0).all()


def test_sites_with_unequal_rows_train_side_by_side_and_see_the_same_rows_where_they_can():
    """Outlier removal leaves sites with different row counts; each still gets full batches, and two sites with
    the same rows get the same batch at every step."""
    from kscope.units.training import _SharedBatches

    a, b, c = torch.arange(40.).view(20, 2), torch.arange(40.).view(20, 2) + 100, torch.arange(34.).view(17, 2)
    data = _SharedBatches({"a": a, "b": b, "c": c}, batch=8, seed=0, device="cpu")
    for _ in range(10):
        got = next(data)
        assert {h: t.shape[0] for h, t in got.items()} == {"a": 8, "b": 8, "c": 8}
        assert torch.equal(got["a"] + 100, got["b"])


def test_training_reports_every_step():
    from kscope.units.training import batch_and_steps

    seen = []
    acts = {Site(0, "mlp.out"): torch.randn(300, 32).bfloat16(), Site(1, "mlp.out"): torch.randn(200, 32).bfloat16()}
    cfg = TrainSAEConfig(expansion=2, k=4, epochs=1, batch_tokens=64)
    train_saes(acts, cfg, "t", on_step=lambda done, total: seen.append((done, total)))
    total = sum(steps for _, steps in {batch_and_steps(cfg, a.shape[0]) for a in acts.values()})  # one count per group
    assert seen[-1] == (total, total) and [d for d, _ in seen] == list(range(1, total + 1))
