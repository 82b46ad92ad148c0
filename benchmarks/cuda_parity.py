"""CPU against CUDA on one machine: the tiny-model ``reproduce`` (compare, faithfulness, interpret, monosemanticity) and
``privacy erase`` (every method, the attacks) run once per device from the same inputs; prints each run's time and how
far every number of the two results lies apart. Needs a CUDA GPU and the test helpers (run from the repository root):

    PYTHONPATH=src:. python benchmarks/cuda_parity.py
"""
import json, os, tempfile, time, traceback
from pathlib import Path
import torch
from typer.testing import CliRunner
from kscope.app.cli import app
from tests.helpers import save_tiny_model, tiny_llama, word_tokenizer
from tests.privacy.test_privacy import CORPUS, ERASE_ARGS
from kscope.privacy.data.dataset import PrivacyConfig, build_private_facts, attack_prompts, strangers

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
runner = CliRunner()
root = Path(tempfile.mkdtemp())
out_dir = Path(os.environ.get("OUT", root))
os.environ["KSCOPE_CACHE"] = str(root / "cache")
model = save_tiny_model(root / "tiny")
res = {}
for dev in ("cpu", "cuda"):
    t = time.time()
    out = root / f"rep-{dev}"
    args = ["reproduce", "--model", str(model), "--layer", "1", "--out", str(out), "--known-top-k", "100", "--min-known-prompts", "1",
            "--sae-tokens", "400", "--generate", "40", "--gen-len", "16", "--sae-expansion", "2", "--sae-k", "32",
            "--stages", "compare,faithfulness,interpret,monosemanticity", "--device", dev]
    r = runner.invoke(app, args)
    print(dev, "reproduce rc", r.exit_code, f"{time.time() - t:.1f}s"); (print(r.output[-600:]), traceback.print_exception(*r.exc_info)) if r.exit_code else None
    res[dev] = json.loads((out / "compare.json").read_text()) if r.exit_code == 0 else None
# privacy: build on cpu once, erase on each device
facts = build_private_facts(PrivacyConfig(n_people=4, attributes=["city", "employer", "phone"]))
texts = [p + " " + f.object for f in facts + strangers(facts, 0) for p in f.prompts + f.heldout_prompts + attack_prompts(f)] + CORPUS
tok = word_tokenizer(texts); base = root / "base"; tiny_llama(vocab_size=len(tok)).save_pretrained(base); tok.save_pretrained(base)
pm = root / "pm"
r = runner.invoke(app, ["privacy", "build", "--model", str(base), "--out", str(pm), "--people", "4", "--attributes", "city,employer,phone",
                        "--epochs", "80", "--lr", "3e-3", "--train", "mlp", "--device", "cuda"])
print("privacy build cuda rc", r.exit_code); (print(r.output[-600:]), traceback.print_exception(*r.exc_info)) if r.exit_code else None
corpus = root / "corpus.txt"; corpus.write_text("\n\n".join(CORPUS * 12))
er = {}
for dev in ("cpu", "cuda"):
    t = time.time()
    o = root / f"erase-{dev}.json"
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(pm), *[str(corpus) if a is None else a for a in ERASE_ARGS], "--out", str(o), "--device", dev])
    print(dev, "erase rc", r.exit_code, f"{time.time() - t:.1f}s"); (print(r.output[-600:]), traceback.print_exception(*r.exc_info)) if r.exit_code else None
    er[dev] = json.loads(o.read_text()) if r.exit_code == 0 else None
    if er[dev]:
        (out_dir / f"erase-{dev}.json").write_text(o.read_text())

def nums(x, pre=""):
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in ("seconds", "elapsed", "config", "provenance", "device", "timing"):
                yield from nums(v, pre + "/" + k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from nums(v, f"{pre}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield pre, float(x)

for name, d in (("compare", res), ("erase", er)):
    if d["cpu"] and d["cuda"]:
        a, b = dict(nums(d["cpu"])), dict(nums(d["cuda"]))
        common = [k for k in a if k in b]
        diffs = sorted(((abs(a[k] - b[k]), k) for k in common), reverse=True)
        print(name, "numbers", len(common), "equal", sum(a[k] == b[k] for k in common), "largest |cpu-cuda|:", diffs[:5])
