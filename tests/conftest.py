"""Fixtures: tiny random models, a few facts; quiet progress bars, two torch threads."""

from __future__ import annotations

import os

import pytest
import torch

from kscope.facts import Fact
from kscope.model.loading import wrap
from tests.helpers import tiny_gpt2, tiny_llama, word_tokenizer

os.environ.setdefault("KSCOPE_QUIET", "1")
torch.set_num_threads(2)


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
