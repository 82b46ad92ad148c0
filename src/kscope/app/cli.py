"""``kscope`` command line: one command per job; each command's options are its config's fields."""

from __future__ import annotations

import typer

from kscope.analyses.autointerp import InterpretJob
from kscope.analyses.faithfulness import FaithfulnessJob
from kscope.analyses.monosemanticity import MonosemanticityJob
from kscope.analyses.sweep import SweepConfig
from kscope.app.explorer import ExploreConfig
from kscope.app.failures import OneLineGroup, friendly
from kscope.app.options import command
from kscope.app.reproduce import ReproduceConfig
from kscope.locate.compare import CompareConfig, LocateConfig
from kscope.privacy.study.erase import EraseJob
from kscope.privacy.data.inject import BuildConfig
from kscope.privacy.forget.run import ForgetConfig
from kscope.progress import console
from kscope.units.provision import TrainSAEJob

app = typer.Typer(cls=OneLineGroup, add_completion=False, no_args_is_help=True, help="kscope, the Knowledge Microscope: neurons vs SAE features for facts in LMs.")
privacy_app = typer.Typer(cls=OneLineGroup, no_args_is_help=True, help="PrivacyParaRel: inject private facts, then erase them with FeatureEdit / DEPN / KN erase.")
app.add_typer(privacy_app, name="privacy")


def _compare(cfg: CompareConfig) -> None:
    from kscope.app.report import compare_table
    from kscope.locate.compare import run_study

    res = run_study(cfg)
    console.print(compare_table(res).rich())
    console.print(f"wrote {cfg.out} ({res.n_facts} facts, {res.seconds:.0f} s)")


def _locate(cfg: LocateConfig) -> None:
    from rich.table import Table

    from kscope.locate.compare import run_study

    res = run_study(cfg)
    for row in res.facts[:5]:
        t = Table(title=f"{row.subject} -> {row.object}")
        for c in ("layer", "units", "top (unit:score)"):
            t.add_column(c)
        for L, entry in row.layers.items():
            for kind, e in entry.items():
                t.add_row(str(L), kind, "  ".join(f"{u.unit}:{u.score:.3g}" for u in e.top[:5]))
        console.print(t)
    console.print(f"wrote {cfg.out} ({res.n_facts} facts)")


def _train_sae(cfg: TrainSAEJob) -> None:
    from kscope.units.provision import train_sae_job

    stats = train_sae_job(cfg)
    console.print({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()})
    console.print(f"wrote SAE to {cfg.out}")


def _faithfulness(cfg: FaithfulnessJob) -> None:
    from kscope.analyses.faithfulness import run_faithfulness_job
    from kscope.app.report import faithfulness_table

    console.print(faithfulness_table(run_faithfulness_job(cfg)).rich())
    console.print(f"wrote {cfg.out_dir}/faithfulness.json and faithfulness.png")


def _interpret(cfg: InterpretJob) -> None:
    from kscope.analyses.autointerp import run_interpret_job
    from kscope.app.report import interpret_table

    console.print(interpret_table(run_interpret_job(cfg)).rich())
    console.print(f"wrote {cfg.out_dir}/interpret.json and interpret.png")


def _monosemanticity(cfg: MonosemanticityJob) -> None:
    from kscope.analyses.monosemanticity import run_monosemanticity_job
    from kscope.app.report import monosemanticity_table

    console.print(monosemanticity_table(run_monosemanticity_job(cfg)).rich())
    console.print(f"wrote {cfg.out_dir}/monosemanticity.json and monosemanticity.png")


def _sweep(cfg: SweepConfig) -> None:
    from kscope.analyses.sweep import run_sweep
    from kscope.app.report_sweep import sweep_tables

    res = run_sweep(cfg)
    for t in sweep_tables(res):
        console.print(t.rich())
    console.print(f"wrote {cfg.out_dir}/sweep.json and sweep.png ({res.seconds['total'] / 60:.1f} min)")


def _privacy_build(cfg: BuildConfig) -> None:
    from kscope.privacy.data.inject import build

    s = build(cfg).summary
    console.print(f"memorised {s.memorised_exact}/{s.n_facts} private facts exactly ({s.memorised_top1} by first-token top-1) "
                  f"after {s.epochs_run} epochs; final loss {s.losses[-1]:.3f}; wrote {cfg.out}")


def _privacy_erase(cfg: EraseJob) -> None:
    from pathlib import Path

    from kscope.app.privacy_figures import plot_all
    from kscope.app.report_privacy import privacy_table
    from kscope.privacy.study.erase import erase

    res = erase(cfg)
    console.print(privacy_table(res).rich())
    out = Path(cfg.out)
    plot_all(res, out.parent, out.stem)
    console.print(f"wrote {cfg.out} and its figures ({out.parent}/{out.stem}*.png)")


def _forget(cfg: ForgetConfig):
    from kscope.privacy.forget.run import AUDIT, PAGE, run_forget

    res = run_forget(cfg)
    erased = sum(r.status == "erased" for r in res.records)
    produced = sum(r.status != "not produced" for r in res.records)
    d = res.delta_ppl
    console.print(f"erased {erased} of {produced} produced records on held-out prompts; kept records "
                  f"{_share(res.keep_records.get('kept'))}, known facts {_share(res.keep_facts.get('kept'))}; "
                  f"perplexity {d.fmt('+.1%')} (layers {','.join(map(str, res.layers))})")
    for reason in res.reasons:
        console.print(f"[red]failed:[/] {reason}")
    what = "the edited model and " if res.written else ""
    console.print(f"wrote {what}{cfg.out}/{AUDIT} and {PAGE}" + ("" if res.written else " (model not written: exit 3; "
                                                                   "--allow-partial writes it)"))
    res.exit_code = 0 if res.written else 3
    return res


def _share(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _explore(cfg: ExploreConfig) -> None:
    from kscope.app.explorer import build_explorer

    console.print(f"wrote {build_explorer(cfg)}")


def _reproduce(cfg: ReproduceConfig) -> None:
    from kscope.app.reproduce import run_reproduce

    run_reproduce(cfg)
    console.print(f"wrote {cfg.out}/index.html and {cfg.out}/results.json")


command(app, "compare", CompareConfig, _compare)
command(app, "locate", LocateConfig, _locate)
command(app, "train-sae", TrainSAEJob, _train_sae)
command(app, "faithfulness", FaithfulnessJob, _faithfulness)
command(app, "interpret", InterpretJob, _interpret)
command(app, "monosemanticity", MonosemanticityJob, _monosemanticity)
command(app, "sweep", SweepConfig, _sweep)
command(privacy_app, "build", BuildConfig, _privacy_build, group="privacy")
command(privacy_app, "erase", EraseJob, _privacy_erase, group="privacy")
command(app, "reproduce", ReproduceConfig, _reproduce)
command(app, "explore", ExploreConfig, _explore)
command(app, "forget", ForgetConfig, _forget)


@app.command("report")
@friendly
def report_cmd(
    run_dir: str = typer.Argument(..., help="A run directory made by `kscope reproduce` (holds results.json)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the README's result tables as Markdown."),
) -> None:
    """Print a run's result tables (from its results.json), stamped with the kscope version and options that made them."""
    from pathlib import Path

    from kscope.app.report import markdown as to_markdown
    from kscope.app.report import stage_tables
    from kscope.app.reproduce import ReproduceResult

    res = ReproduceResult.load(Path(run_dir) / "results.json")
    if markdown:
        typer.echo(to_markdown(res), nl=False)
        return
    from rich.markup import escape

    from kscope.app.verdicts import answers

    for a in answers(res):
        console.print(f"[bold]{escape(a.question)}[/bold] {escape(f'[{a.says}]')} {escape(a.sentence)}", highlight=False)
    for _, table, _ in stage_tables(res):
        console.print(table.rich())


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
