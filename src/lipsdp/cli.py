"""The `lipsdp` command line (typer + rich). Library errors become one-line messages and exit code 2."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

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
    solver: Annotated[Optional[str], typer.Option(help="SDP solver: clarabel, scs, mosek")] = None,
    split: Annotated[Optional[int], typer.Option(help="split into pieces of K weight matrices")] = None,
    workers: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
    lower: Annotated[bool, typer.Option("--lower", help="also compute a lower bound")] = False,
    seed: Annotated[int, typer.Option(help="random seed for the lower bound")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress")] = False,
) -> None:
    """Bound the Lipschitz constant of one or more models."""
    from lipsdp.api import estimate as run_estimate

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    results = []
    for path in paths:
        try:
            res = run_estimate(path, method, solver=solver, split=split, workers=workers, lower=lower, seed=seed)
        except LipSDPError as exc:
            _fail(f"{path}: {exc}")
        results.append((str(path), res))
    if as_json:
        payload = [dict(r.to_dict(), model=label) for label, r in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        return
    console.print(result_table(results))
    for label, r in results:
        for note in r.notes:
            console.print(f"[dim]{label}: {note}[/]", highlight=False)


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
