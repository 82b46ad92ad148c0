"""Make tests/data/results_small.json: a whole (tiny) reproduce run, every section present. Then:
`kscope report --markdown /tmp/tiny/small/report > tests/data/results_small.md`."""
import os
import shutil
import sys
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ["KSCOPE_QUIET"] = "1"
os.environ["KSCOPE_CACHE"] = "/tmp/tiny/small_cache"
from typer.testing import CliRunner
from tests.helpers import tiny_llama, word_tokenizer
from kscope.app.cli import app
from kscope.privacy.data.dataset import PrivacyConfig, attack_prompts, build_private_facts, strangers
from kscope.privacy.edit.plan import METHODS
root = "/tmp/tiny/small"; shutil.rmtree(root, ignore_errors=True); os.makedirs(root)
corpus = ["the capital of france is paris", "people in spain speak spanish", "the capital of germany is berlin",
          "the eiffel tower is in paris", "the official language of italy is italian", "history and science today",
          "one two three and it is a country", "when people speak french in the city", "new york is a city"]
facts = build_private_facts(PrivacyConfig(n_people=4, attributes=["city", "employer", "phone"]))
tok = word_tokenizer([p + " " + f.object for f in facts + strangers(facts, 0) for p in f.prompts + f.heldout_prompts + attack_prompts(f)]
                     + corpus)
tiny_llama(vocab_size=len(tok)).save_pretrained(f"{root}/model"); tok.save_pretrained(f"{root}/model")
open(f"{root}/corpus.txt", "w").write("\n\n".join(corpus * 12))
r = CliRunner().invoke(app, ["reproduce", "--model", f"{root}/model", "--layer", "1", "--out", f"{root}/report", "--known-top-k", "100",
    "--min-known-prompts", "1", "--sae-tokens", "400", "--sae-expansion", "2", "--sae-k", "4", "--generate", "0", "--text", f"{root}/corpus.txt",
    "--privacy-people", "4", "--privacy-attributes", "city,employer,phone", "--privacy-epochs", "80", "--privacy-lr", "3e-3",
    "--privacy-train", "mlp", "--erase-layers", "0-2", "--erase-resid-layers", "1", "--erase-neuron-budgets", "8,64",
    "--erase-feature-budgets", "4,16", "--erase-revs-budgets", "2", "--erase-taus", "0.5", "--erase-method", ",".join(METHODS), "--erase-keyed-lams", "0.1,1",
    "--erase-keyed-steps", "5", "--erase-keyed-weight-decay", "0", "--erase-keyed-corpus-tokens", "300", "--erase-samples", "3",
    "--erase-relearn-steps", "2", "--erase-steps", "3", "--erase-ppl-texts", "2", "--erase-generic-texts", "4", "--erase-max-unrelated", "5",
    "--sweep-layers", "0,2", "--stages", "compare,faithfulness,interpret,monosemanticity,privacy-build,privacy-erase,sweep"])
print(r.output[-2000:])
if r.exception and not isinstance(r.exception, SystemExit):
    import traceback; traceback.print_exception(r.exception)
shutil.copy(f"{root}/report/results.json", os.path.join(ROOT, "tests", "data", "results_small.json"))
