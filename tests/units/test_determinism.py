"""Same inputs, same numbers: a forward pass, an SAE and a generated corpus do not depend on the thread count, and an
SAE does not depend on which others are trained beside it. Each thread count runs in a fresh process, as a user's
run would (MKL's mode is fixed when it loads)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys, kscope, torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import LlamaConfig, LlamaForCausalLM
from kscope.model.loading import wrap
from kscope.model.sites import Site
from kscope.numerics import mkl_strict, tensor_hash
from kscope.units.corpus import generate_texts
from kscope.units.training import TrainSAEConfig, train_saes
from tests.helpers import WORDS, word_tokenizer
out = {"strict": mkl_strict()}

# Small products (5 rows) are where MKL's default mode splits the work differently on 1 and 2 threads: with
# MKL_CBWR="" (MKL's default, off) these logits differ in their last bits; kscope's strict mode makes them equal.
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
lm = wrap(LlamaForCausalLM(cfg), word_tokenizer())
with torch.no_grad():
    out["logits"] = tensor_hash({"logits": lm.model(torch.arange(5)[None] + 7).logits})
out["corpus"] = generate_texts(lm, 5, 24, seed=3)

g = torch.Generator().manual_seed(0)
basis = torch.randn(32, 96, generator=g)
codes = (torch.rand(3000, 32, generator=g) < 0.1).float() * torch.rand(3000, 32, generator=g)
x = (codes @ basis + 0.01 * torch.randn(3000, 96, generator=g)).bfloat16()
tcfg = TrainSAEConfig(expansion=4, k=8, batch_tokens=256, epochs=2, max_tokens=3000)
a, b, c = Site(3, "mlp.out"), Site(5, "resid.post"), Site(7, "mlp.out")
alone = train_saes({a: x}, tcfg, "t")[a]
both = train_saes({b: x.flip(0), a: x, c: x[:2000]}, tcfg, "t")  # b trains in lockstep with a, c (fewer rows) apart
out["sae"] = [tensor_hash(s.state_dict()) for s in (alone, both[a], both[b])]

# Same-site baselines are fitted with numpy's BLAS (PCA) and torch's LAPACK (random directions' QR, the mean)
from threadpoolctl import threadpool_limits
from kscope.units.decompositions import baseline_units
with threadpool_limits(limits=int(sys.argv[1])):
    acts = (torch.randn(6000, 96, generator=g) @ torch.randn(96, 96, generator=g)).float()
    fits = [baseline_units(kind, a, acts) for kind in ("pca", "random")]
out["baselines"] = [tensor_hash({"enc": u.enc, "dec": u.dec, "mean": u.mean}) for u in fits]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs():
    def run(threads: int) -> dict:
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(threads)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    return run(1), run(2)


def test_a_forward_is_bitwise_the_same_on_one_and_two_threads(runs):
    one, two = runs
    assert one["strict"] is True and one["logits"] == two["logits"]


def test_sae_is_bitwise_the_same_on_one_and_two_threads_and_alone_or_beside_others(runs):
    one, two = runs
    alone, beside, other = one["sae"]
    assert one["sae"] == two["sae"]
    assert alone == beside and other != alone


def test_generated_corpus_is_the_same_on_one_and_two_threads(runs):
    one, two = runs
    assert one["corpus"] == two["corpus"] and len(one["corpus"]) == 5 and len(set(one["corpus"])) > 1


def test_same_site_baselines_are_bitwise_the_same_on_one_and_two_threads(runs):
    one, two = runs
    assert one["baselines"] == two["baselines"] and len(set(one["baselines"])) == 2


def test_a_model_has_one_fingerprint_wherever_it_was_loaded_from(tmp_path):
    from kscope.model.loading import ModelConfig, load_model
    from tests.helpers import save_tiny_model

    a, b = save_tiny_model(tmp_path / "a"), save_tiny_model(tmp_path / "b")
    other = save_tiny_model(tmp_path / "c", seed=1)
    fa, fb, fc = (load_model(ModelConfig(model=str(d))).fingerprint for d in (a, b, other))
    assert fa == fb != fc


def test_one_thread_gives_every_thread_pool_back():
    """The one-thread section of PCA / ICA fits leaves torch, OpenMP and MKL as it found them: it once left MKL on one
    thread for the rest of the process (torch still said 2), and every later stage ran at half speed on 2 cores."""
    import re

    import torch

    from kscope.units.decompositions import one_thread

    def pools():
        return dict(re.findall(r"(\w+_get_\w*threads)\(\) : (\d+)", torch.__config__.parallel_info()))

    before = pools()
    with one_thread():
        inside = pools()
    assert pools() == before and before
    assert all(v == "1" for k, v in inside.items() if "interop" not in k)
