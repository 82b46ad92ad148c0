"""Fixtures: tiny random models, a few facts; quiet progress bars, two torch threads."""

from __future__ import annotations

import os

import kscope  # noqa: F401  first: it sets MKL's reproducible mode before torch loads MKL
import pytest
import torch

from kscope.facts import Fact
from kscope.model.loading import wrap
from tests.helpers import tiny_gpt2, tiny_llama, word_tokenizer

os.environ.setdefault("KSCOPE_QUIET", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests write SAEs and generated text to a temporary cache, never the user's; the dequantized default
    model is shared with the user's cache when it is already there (it takes ~20 s to make)."""
    from kscope.model.loading import default_cache_dir

    real = default_cache_dir() / "smollm2-135m-instruct"
    cache = tmp_path_factory.mktemp("kscope-cache")
    if (real / "model.safetensors").exists():
        (cache / "smollm2-135m-instruct").symlink_to(real)
    old = os.environ.get("KSCOPE_CACHE")
    os.environ["KSCOPE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("KSCOPE_CACHE", None)
    else:
        os.environ["KSCOPE_CACHE"] = old


@pytest.fixture(params=["llama", "gpt2"])
def lm(request):
    model = tiny_llama() if request.param == "llama" else tiny_gpt2()
    return wrap(model, word_tokenizer(), name=f"tiny-{request.param}")


@pytest.fixture
def llama_lm():
    return wrap(tiny_llama(), word_tokenizer(), name="tiny-llama")


@pytest.fixture
def facts():
    return [
        Fact("france", "capital", "paris", ["the capital of france is", "france 's capital city is", "the capital city of france is"]),
        Fact("germany", "capital", "berlin", ["the capital of germany is", "germany 's capital city is"]),
        Fact("spain", "language", "spanish", ["people in spain speak", "the official language of spain is"]),
    ]
