"""The tiny privacy model the privacy tests share."""

import pytest
from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.privacy.data.dataset import PrivacyConfig, attack_prompts, build_private_facts, strangers
from tests.helpers import tiny_llama, word_tokenizer

runner = CliRunner()


CORPUS = ["the capital of france is paris", "people in spain speak spanish", "the capital of germany is berlin",
          "the eiffel tower is in paris", "the official language of italy is italian", "history and science today",
          "one two three and it is a country", "when people speak french in the city", "new york is a city"]


@pytest.fixture(scope="module")
def privacy_model(tmp_path_factory):
    """A tiny LLaMA with 12 private facts of 4 people injected into its MLPs only (so that the MLPs hold them)."""
    facts = build_private_facts(PrivacyConfig(n_people=4, attributes=["city", "employer", "phone"]))
    texts = [p + " " + f.object for f in facts + strangers(facts, 0) for p in f.prompts + f.heldout_prompts + attack_prompts(f)] + CORPUS
    tok = word_tokenizer(texts)
    base = tmp_path_factory.mktemp("base")
    tiny_llama(vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path_factory.mktemp("p") / "injected"
    r = runner.invoke(app, ["privacy", "build", "--model", str(base), "--out", str(out), "--people", "4",
                            "--attributes", "city,employer,phone", "--epochs", "80", "--lr", "3e-3", "--train", "mlp"])
    assert r.exit_code == 0, r.output
    corpus = tmp_path_factory.mktemp("c") / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 12))
    return base, out, corpus
