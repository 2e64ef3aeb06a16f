"""The `lipsdp` command line (typer + rich). Library errors become one-line messages and exit code 2."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lipsdp.errors import LipSDPError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Certified Lipschitz bounds for neural networks.")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _fmt(x: float | None, digits: int = 6) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def result_table(rows: list[tuple[str, object]], title: str | None = None) -> Table:
    """Rich table of results: one row per (label, Result)."""
    table = Table(title=title)
    for col in ("model", "method", "upper (verified)", "lower", "upper/lower", "raw", "seconds"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for label, r in rows:
        table.add_row(
            label, r.method, _fmt(r.upper), _fmt(r.lower), _fmt(r.ratio, 4), _fmt(r.raw), f"{r.seconds:.2f}"
        )
    return table


@app.command()
def estimate(
    paths: Annotated[list[Path], typer.Argument(help="model files (.npz, .mat, .onnx)")],
    method: Annotated[str, typer.Option("--method", "-m", help="bounding method (see `lipsdp methods`)")] = "neuron",
    solver: Annotated[str | None, typer.Option(help="SDP solver: clarabel, scs, mosek")] = None,
    split: Annotated[int | None, typer.Option(help="split into pieces of K weight matrices")] = None,
    workers: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
    lower: Annotated[bool, typer.Option("--lower", help="also compute a lower bound")] = False,
    seed: Annotated[int, typer.Option(help="random seed for the lower bound")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress")] = False,
    box: Annotated[
        tuple[str, str] | None,
        typer.Option(help="local bound on the box LOW <= x <= HIGH (numbers or .npy files)", metavar="LOW HIGH"),
    ] = None,
    ball: Annotated[
        tuple[Path, float] | None,
        typer.Option(help="local bound on the l2 ball around POINT.npy of radius EPS", metavar="POINT.npy EPS"),
    ] = None,
    pair: Annotated[
        tuple[int, int] | None, typer.Option(help="bound the logit difference f_I - f_J", metavar="I J")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="append one JSON line per model to FILE as each finishes")
    ] = None,
    budget: Annotated[float | None, typer.Option(help="time budget in seconds (method anytime)")] = None,
    dask: Annotated[str | None, typer.Option(help="address of a Dask scheduler to run on")] = None,
) -> None:
    """Bound the Lipschitz constant of one or more models (in parallel over models with --workers)."""
    from rich.progress import Progress

    from lipsdp.api import estimate as run_estimate
    from lipsdp.api import estimate_many

    region = _region_option(box, ball)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    options = {"budget": budget} if budget is not None else {}
    done: dict[int, object] = {}
    show_progress = len(paths) > 1 and not as_json and console.is_terminal

    def finished(index: int, res) -> None:
        done[index] = res
        if out is not None:  # written as each model finishes, so an interrupted run keeps its results
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(dict(res.to_dict(), model=str(paths[index]))) + "\n")
        if show_progress:
            progress.advance(task)

    try:
        with Progress(console=err_console, disable=not show_progress, transient=True) as progress:
            task = progress.add_task(f"{method} on {len(paths)} models", total=len(paths))
            common = dict(solver=solver, split=split, lower=lower, seed=seed, region=region, pair=pair, **options)
            if len(paths) == 1:  # one model: workers / dask go to its split pieces
                ran = [run_estimate(paths[0], method, workers=workers, dask=dask, **common)]
                finished(0, ran[0])
            else:
                ran = estimate_many(list(paths), method, workers=workers, dask=dask, on_done=finished, **common)
        results = [(str(p), r) for p, r in zip(paths, ran)]
    except LipSDPError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        kept = f"; their results are in {out}" if out is not None and done else ""
        err_console.print(
            f"interrupted after {len(done)} of {len(paths)} models{kept}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(130) from None
    if as_json:
        payload = [dict(r.to_dict(), model=label) for label, r in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        return
    console.print(result_table(results))
    for label, r in results:
        for note in r.notes:
            console.print(f"[dim]{label}: {note}[/]", highlight=False)


def _array_arg(text: str | Path, name: str):
    """A number, or the array in a .npy file."""
    import numpy as np

    text = str(text)
    if text.lower().endswith(".npy"):
        try:
            return np.load(text, allow_pickle=False)
        except (OSError, ValueError) as exc:
            _fail(f"{name}: cannot read {text} ({exc})")
    try:
        return float(text)
    except ValueError:
        _fail(f"{name}: '{text}' is neither a number nor a .npy file")


def _region_option(box: tuple[str, str] | None, ball: tuple[Path, float] | None):
    """The input region of --box / --ball (at most one), or None."""
    from lipsdp.region import Ball, Box

    if box is not None and ball is not None:
        _fail("give at most one of --box and --ball")
    try:
        if box is not None:
            return Box(_array_arg(box[0], "--box LOW"), _array_arg(box[1], "--box HIGH"))
        if ball is not None:
            return Ball(_array_arg(ball[0], "--ball POINT"), ball[1])
    except LipSDPError as exc:
        _fail(str(exc))
    return None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def certify(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="classifier file (.npz, .mat, .onnx)")],
    data: Annotated[Path, typer.Argument(help=".npz file with arrays x (inputs) and y (integer labels)")],
    radii: Annotated[
        list[float] | None, typer.Option("--radii", help="radii for the certified accuracy: --radii 0.1 0.2 ...")
    ] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="bounding method (see `lipsdp methods`)")] = "neuron",
    bound: Annotated[str, typer.Option(help="'pair' (one bound per class pair) or 'global'")] = "pair",
    solver: Annotated[str | None, typer.Option(help="SDP solver: clarabel, scs, mosek")] = None,
    workers: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress")] = False,
) -> None:
    """Certified l2 robustness radii and certified accuracy of a classifier on a labelled data set."""
    import numpy as np

    from lipsdp.robustness import certify as run_certify

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    values = list(radii or [])
    for extra in ctx.args:  # `--radii 0.1 0.2 0.3`: the values after the first arrive as extra arguments
        try:
            values.extend(float(v) for v in extra.split(",") if v)
        except ValueError:
            _fail(f"unexpected argument '{extra}' (radii must be numbers)")
    if ctx.args and radii is None:
        _fail(f"unexpected arguments {ctx.args}")
    values = values or [0.0, 0.1, 0.25, 0.5, 1.0]
    try:
        with np.load(data, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                _fail(f"{data}: needs arrays named x and y (found {list(arrays.keys())})")
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError) as exc:
        _fail(f"{data}: not a readable .npz file ({exc})")
    try:
        cert = run_certify(model, x, y, method=method, bound=bound, solver=solver, workers=workers)
    except LipSDPError as exc:
        _fail(f"{model}: {exc}")
    if as_json:
        print(json.dumps(dict(cert.to_dict(values), model=str(model)), indent=2))
        return
    table = Table(title=f"{model}: certified accuracy ({bound} bounds, {method})")
    table.add_column("radius", justify="right")
    table.add_column("certified accuracy", justify="right")
    for r in values:
        table.add_row(f"{r:g}", f"{cert.certified_accuracy(r):.4f}")
    console.print(table)
    correct = cert.radii[cert.correct]
    median = _fmt(float(np.median(correct))) if correct.size else "-"
    console.print(
        f"clean accuracy {cert.clean_accuracy:.4f}; median certified radius of correct inputs {median}; "
        f"{cert.seconds:.2f} s",
        highlight=False,
    )


@app.command()
def compare(
    path: Annotated[Path, typer.Argument(help="model file (.npz, .mat, .onnx)")],
    methods: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="tiers to run (repeatable)")
    ] = None,
    budget: Annotated[float, typer.Option(help="time budget of the anytime tier, seconds")] = 30.0,
    seed: Annotated[int, typer.Option(help="random seed for the lower bound")] = 0,
    plot: Annotated[Path | None, typer.Option("--plot", help="save a bar chart to this PNG file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Run the bounding tiers on one model: verified upper, lower, ratio, seconds, peak memory."""
    from lipsdp.compare import DEFAULT_TIERS, plot_comparison
    from lipsdp.compare import compare as run_compare

    tiers = tuple(methods) if methods else DEFAULT_TIERS
    try:
        with console.status("bounding...") as status:
            rows, lower_value = run_compare(
                path, tiers, budget=budget, seed=seed,
                on_done=lambda row: status.update(f"{row.result.method} done; running the next tier..."),
            )
    except LipSDPError as exc:
        _fail(f"{path}: {exc}")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        ax = plot_comparison(rows, lower_value)
        ax.figure.tight_layout()
        ax.figure.savefig(plot, dpi=120)
    if as_json:
        print(json.dumps([dict(r.result.to_dict(), peak_mib=r.peak_bytes / 2**20) for r in rows], indent=2))
        return
    table = Table(title=f"{path} (lower bound {_fmt(lower_value)})")
    for col in ("method", "upper (verified)", "lower", "upper/lower", "seconds", "peak MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        res = r.result
        table.add_row(res.method, _fmt(res.upper), _fmt(res.lower), _fmt(res.ratio, 4), f"{res.seconds:.2f}",
                      f"{r.peak_bytes / 2**20:.1f}")
    console.print(table)


@app.command()
def methods() -> None:
    """List the available methods."""
    from lipsdp.methods import available_methods

    table = Table()
    table.add_column("method")
    table.add_column("what it computes")
    for name, desc in available_methods().items():
        table.add_row(name, desc)
    console.print(table)


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for REPORT.md, results.json, figures/")] = Path(
        "report"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes: under a minute, for a smoke test")] = False,
    mnist: Annotated[Path | None, typer.Option(help="also run MNIST from a Keras-style mnist.npz")] = None,
    copy_figures: Annotated[
        Path | None, typer.Option("--copy-figures", help="also copy the PNGs here (e.g. docs/figures)")
    ] = None,
) -> None:
    """Rerun the paper's experiments (random nets, trained classifiers, certified robustness) into a report."""
    from lipsdp.reproduce import run

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        res = run(out, quick=quick, mnist=mnist, figures_to=copy_figures,
                  progress=lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
    except LipSDPError as exc:
        _fail(str(exc))
    for text, ok in res.checks:
        console.print(f"{'[green]ok[/]' if ok else '[bold red]FAILED[/]'}  {text}", highlight=False)
    console.print(f"report: {res.report}", highlight=False)
    if not all(ok for _, ok in res.checks):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except LipSDPError as exc:  # any library error that escaped a command
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
