"""Fact-parallel scaling: the same `kscope locate` job on 1 and 2 Ray workers (one torch thread each), side by side.

Measures facts/s of the per-fact work (IG over all layers' neurons of SmolLM2) from each run's per-worker
record, and the wall time of the whole command (model loads and Ray start-up included).

    pip install 'kscope[ray]'
    python benchmarks/scaling.py --facts 16 --layers 0-29
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(workers: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "kscope", "locate", "--max-facts", str(args.facts), "--layers", args.layers, "--no-features",
           "--steps", str(args.steps), "--workers", str(workers), "--threads-per-worker", "1", "--out", str(out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "KSCOPE_QUIET": "1"})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    res = json.loads(out.read_text())
    busy = max(w["seconds"] for w in res["workers"].values())  # the slowest worker bounds the per-fact phase
    return {"workers": workers, "wall": wall, "facts": res["n_facts"], "facts_per_s": res["n_facts"] / busy,
            "per_worker": res["workers"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=16)
    ap.add_argument("--layers", default="0-29")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, Path(tmp) / "one.json")
        two = run(2, args, Path(tmp) / "two.json")
    print(f"locate, {one['facts']} built-in facts, neurons at layers {args.layers}, IG {args.steps} steps, one torch thread per worker")
    for r in (one, two):
        print(f"  {r['workers']} worker(s): {r['facts_per_s']:.3f} facts/s in the per-fact phase; whole command {r['wall']:.0f} s; "
              + ", ".join(f"{k} {v['facts']} facts" for k, v in sorted(r["per_worker"].items())))
    print(f"  ratio 2 / 1 workers: {two['facts_per_s'] / one['facts_per_s']:.2f}x (per-fact phase), "
          f"{one['wall'] / two['wall']:.2f}x (whole command)")


if __name__ == "__main__":
    main()
