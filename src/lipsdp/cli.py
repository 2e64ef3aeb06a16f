"""The `lipsdp` command line (typer + rich). Library errors become one-line messages and exit code 2."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lipsdp.errors import LipSDPError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Certified Lipschitz bounds for neural networks.")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _about(path: Path, exc: Exception) -> str:
    """The error's message, led by the file it concerns (once: loaders already name their file)."""
    message = str(exc)
    return message if message.startswith(f"{path}:") else f"{path}: {message}"


def _fmt(x: float | None, digits: int = 6) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


@dataclass(frozen=True)
class Column:
    """A table column: `fold` columns (file names, descriptions) may fold onto several lines; the others
    (numbers, method names) are always printed whole."""

    header: str
    fold: bool = False
    justify: str = "right"


# Narrowest a folding column gets before the table gives way to one block of lines per row.
_FOLD_MIN = 8


def print_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
    target: Console | None = None,
) -> None:
    """Print rows so that no cell of a whole column is ever cut, in any console width (pipes too).

    Every column gets a fixed width: whole columns their longest cell (or header word), folding columns
    what is left. A boxed table if it fits, else a borderless one; when even folding columns at
    `_FOLD_MIN` characters do not fit, each row becomes `header: value` lines (the terminal wraps them),
    so a number is never shortened, however many columns there are."""
    target = target or console
    n = len(columns)
    natural = [
        max([max((len(w) for w in col.header.split()), default=1)] + [len(row[i]) for row in rows])
        for i, col in enumerate(columns)
    ]
    folding = [i for i, c in enumerate(columns) if c.fold]
    # (table options, characters besides the cells): the default box has n + 1 rules and 2 spaces of
    # padding per column; the borderless style only pads between columns.
    styles = [({}, 3 * n + 1), ({"box": None, "pad_edge": False, "show_edge": False}, 2 * (n - 1))]
    for options, overhead in styles:
        widths = [min(natural[i], _FOLD_MIN) if i in folding else natural[i] for i in range(n)]
        room = target.width - overhead - sum(widths)
        if room < 0:
            continue
        for i in folding:  # share what is left, first come first served
            extra = min(room, natural[i] - widths[i])
            widths[i] += extra
            room -= extra
        table = Table(title=Text(title) if title else None, **options)
        for col, width in zip(columns, widths):
            overflow = "fold" if col.fold else "ellipsis"  # whole columns are never narrower than a cell
            table.add_column(col.header, justify=col.justify, width=width, overflow=overflow)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        target.print(table)
        return
    if title:
        target.print(title, highlight=False, markup=False, soft_wrap=True)
    for row in rows:
        target.print(f"{columns[0].header}: {row[0]}", highlight=False, markup=False, soft_wrap=True)
        for col, cell in zip(columns[1:], row[1:]):
            target.print(f"  {col.header}: {cell}", highlight=False, markup=False, soft_wrap=True)


RESULT_COLUMNS = (
    Column("model", fold=True, justify="left"), Column("method"), Column("upper (verified)"), Column("lower"),
    Column("upper/lower"), Column("gap (proved)"), Column("raw"), Column("seconds"),
)


def _gap(x: float | None) -> str:
    """A proven relative gap to the SDP optimum, as a percentage with 2 significant digits."""
    return "-" if x is None else f"{100.0 * x:.2g}%"


def gap_sentence(r) -> str | None:
    """'within x% of the LipSDP-Neuron optimum (proved)' for results that carry a proven SDP lower bound."""
    if r.gap is None:
        return None
    variant = {"layer": "LipSDP-Layer"}.get(r.method, "LipSDP-Neuron")
    return f"within {_gap(r.gap)} of the {variant} optimum (proved: its lower bound is {_fmt(r.sdp_lower)})"


def result_rows(rows: list[tuple[str, object]]) -> list[list[str]]:
    """The cells of the estimate table: one row per (label, Result), every bound with 6 digits."""
    return [
        [label, r.method, _fmt(r.upper), _fmt(r.lower), _fmt(r.ratio, 4), _gap(r.gap), _fmt(r.raw),
         f"{r.seconds:.2f}"]
        for label, r in rows
    ]


def model_labels(paths: Sequence[Path]) -> list[str]:
    """Short table labels: the file names when they are all different, else the paths as given."""
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


@app.command()
def estimate(
    paths: Annotated[list[Path], typer.Argument(help="model files (.npz, .mat, .onnx)")],
    method: Annotated[str, typer.Option("--method", "-m", help="bounding method (see `lipsdp methods`)")] = "neuron",
    solver: Annotated[str | None, typer.Option(help="SDP solver: clarabel, scs, mosek")] = None,
    split: Annotated[int | None, typer.Option(help="split into pieces of K weight matrices")] = None,
    pools: Annotated[
        str,
        typer.Option(help="max pools that factor the graph: compose (bound the parts, times sqrt(m)) or exact"),
    ] = "compose",
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
    activation: Annotated[
        str | None,
        typer.Option(help="hidden activation of .npz/.mat files that do not record it (e.g. maxmin, groupsort:4)"),
    ] = None,
    certificate: Annotated[
        Path | None,
        typer.Option(
            "--certificate", metavar="DIR",
            help="write one JSON certificate per model into DIR (re-check it with `lipsdp verify CERT MODEL`)",
        ),
    ] = None,
) -> None:
    """Bound the Lipschitz constant of one or more models (in parallel over models with --workers)."""
    from rich.progress import Progress

    from lipsdp.api import estimate as run_estimate
    from lipsdp.api import estimate_many

    region = _region_option(box, ball)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    options = {"budget": budget} if budget is not None else {}
    if activation is not None:
        options["activation"] = activation
    done: dict[int, object] = {}
    failed: list[int] = []
    show_progress = len(paths) > 1 and not as_json and console.is_terminal
    cert_paths = _certificate_paths(certificate, paths) if certificate is not None else None

    def finished(index: int, res) -> None:
        if cert_paths is not None and not isinstance(res, LipSDPError):
            try:
                res.save_certificate(cert_paths[index])
            except LipSDPError as exc:
                res = type(exc)(f"{paths[index]}: {exc}")
        if isinstance(res, LipSDPError):  # one bad model: one error line, the others go on
            failed.append(index)
            err_console.print(f"[bold red]error:[/] {escape(str(res))}", highlight=False, soft_wrap=True)
            if show_progress:
                progress.advance(task)
            return
        done[index] = res
        if out is not None:  # written as each model finishes, so an interrupted run keeps its results
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(dict(res.to_dict(), model=str(paths[index]))) + "\n")
        if show_progress:
            progress.advance(task)

    try:
        with Progress(console=err_console, disable=not show_progress, transient=True) as progress:
            task = progress.add_task(f"{method} on {len(paths)} models", total=len(paths))
            common = dict(solver=solver, split=split, lower=lower, seed=seed, region=region, pair=pair, pools=pools,
                          **options)
            if len(paths) == 1:  # one model: workers / dask go to its split pieces
                ran = [run_estimate(paths[0], method, workers=workers, dask=dask, **common)]
                finished(0, ran[0])
            else:
                estimate_many(
                    list(paths), method, workers=workers, dask=dask, on_done=finished, keep_going=True, **common
                )
    except LipSDPError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        kept = f"; their results are in {out}" if out is not None and done else ""
        err_console.print(
            f"interrupted after {len(done)} of {len(paths)} models{kept}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(130) from None
    kept = sorted(done)
    if as_json:
        payload = [dict(done[i].to_dict(), model=str(paths[i])) for i in kept]
        print(json.dumps(payload[0] if len(paths) == 1 else payload, indent=2))
    elif kept:
        labels = model_labels(paths)
        print_table(RESULT_COLUMNS, result_rows([(labels[i], done[i]) for i in kept]))
        for i in kept:
            if (sentence := gap_sentence(done[i])) is not None:
                console.print(f"{escape(labels[i])}: {sentence}", highlight=False)
            for note in done[i].notes:
                console.print(f"[dim]{escape(labels[i])}: {escape(note)}[/]", highlight=False)
    if failed:  # every other model's result is printed (and in --out); the exit code says not all are
        raise typer.Exit(2)


def _certificate_paths(folder: Path, paths: Sequence[Path]) -> list[Path]:
    """DIR/<model stem>.cert.json per model (with -1, -2, ... where two models share a stem)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"--certificate: cannot create the folder {folder} ({exc})")
    stems = [Path(p).stem for p in paths]
    return [
        folder / (f"{stem}.cert.json" if stems.count(stem) == 1 else f"{stem}-{i}.cert.json")
        for i, stem in enumerate(stems)
    ]


@app.command()
def verify(
    cert: Annotated[Path, typer.Argument(help="certificate file written by `lipsdp estimate --certificate`")],
    model: Annotated[Path, typer.Argument(help="the model file (.npz, .mat, .onnx) the certificate is about")],
    prec: Annotated[int, typer.Option(help="bits of the ball arithmetic")] = 128,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of one line")] = False,
    activation: Annotated[
        str | None,
        typer.Option(help="hidden activation of .npz/.mat files that do not record it (e.g. maxmin, groupsort:4)"),
    ] = None,
) -> None:
    """Re-prove a certificate's bound independently (interval arithmetic); exit code 1 if it is rejected."""
    from dataclasses import asdict

    from lipsdp.verify import verify as run_verify

    try:
        verdict = run_verify(cert, model, prec=prec, **({} if activation is None else {"activation": activation}))
    except LipSDPError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(dict(asdict(verdict), certificate=str(cert), model=str(model)), indent=2))
    elif verdict.accepted:
        console.print(f"[green]accepted[/]: {escape(verdict.reason)} ({verdict.seconds:.2f} s)", highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"[bold red]rejected[/]: {escape(verdict.reason)}", highlight=False, soft_wrap=True)
    if not verdict.accepted:
        raise typer.Exit(1)


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
    data: Annotated[
        Path, typer.Argument(help=".npz file with arrays x (inputs) and y (integer labels), or .vnnlib properties")
    ],
    radii: Annotated[
        list[float] | None, typer.Option("--radii", help="radii for the certified accuracy: --radii 0.1 0.2 ...")
    ] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="bounding method (see `lipsdp methods`)")] = "neuron",
    bound: Annotated[
        str, typer.Option(help="'pair' (one bound per class pair), 'global', or 'local' (.vnnlib: on each box)")
    ] = "pair",
    solver: Annotated[str | None, typer.Option(help="SDP solver: clarabel, scs, mosek")] = None,
    workers: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress")] = False,
) -> None:
    """Certified l2 robustness radii and certified accuracy of a classifier on a labelled data set, or, with
    VNN-LIB files (lipsdp certify MODEL PROPS/*.vnnlib), which robustness properties the Lipschitz margin proves."""
    import numpy as np

    from lipsdp.robustness import certify as run_certify

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if data.name.lower().endswith((".vnnlib", ".vnnlib.gz")):  # the other property files arrive as extra args
        _certify_vnnlib(model, [data, *(Path(a) for a in ctx.args)], method, bound, solver, workers, as_json)
        return
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
        _fail(_about(model, exc))
    if as_json:
        print(json.dumps(dict(cert.to_dict(values), model=str(model)), indent=2))
        return
    print_table(
        [Column("radius"), Column("certified accuracy")],
        [[f"{r:.6g}", f"{cert.certified_accuracy(r):.4f}"] for r in values],
        title=f"{model.name}: certified accuracy ({bound} bounds, {method})",
    )
    correct = cert.radii[cert.correct]
    median = _fmt(float(np.median(correct))) if correct.size else "-"
    console.print(
        f"clean accuracy {cert.clean_accuracy:.4f}; median certified radius of correct inputs {median}; "
        f"{cert.seconds:.2f} s",
        highlight=False,
    )


def _certify_vnnlib(
    model: Path, props: list[Path], method: str, bound: str, solver: str | None, workers: int, as_json: bool
) -> None:
    """One row per VNN-LIB property: label, prediction at the box centre, l2 radius of the box, slack of the
    Lipschitz margin (margin - L * radius) and whether it certifies the property."""
    from lipsdp.robustness import certify_properties

    try:
        results = certify_properties(model, props, method=method, bound=bound, solver=solver, workers=workers)
    except LipSDPError as exc:
        _fail(_about(model, exc))
    if as_json:
        print(json.dumps({"model": str(model), "properties": [r.to_dict() for r in results]}, indent=2))
        return
    print_table(
        [Column("property", fold=True, justify="left"), Column("label"), Column("argmax"), Column("l2 radius"),
         Column("slack"), Column("certified")],
        [[Path(r.path).name, str(r.label), str(r.predicted), _fmt(r.radius), _fmt(r.slack), "yes" if r.certified
          else "no"] for r in results],
        title=f"{model.name}: VNN-LIB properties ({bound} bounds, {method})",
    )
    certified = sum(r.certified for r in results)
    console.print(f"{certified} of {len(results)} properties certified (no counter-example in their boxes); "
                  "'no' means the margin argument is not enough, not that a property is false", highlight=False)
    beyond = sum(r.beyond_reach is not None for r in results)
    if beyond:
        console.print(f"{beyond} of them are beyond any Lipschitz margin: a secant of some f_label - f_j inside the "
                      "box is steeper than margin / radius (a complete verifier is needed there)", highlight=False)


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
    activation: Annotated[
        str | None,
        typer.Option(help="hidden activation of .npz/.mat files that do not record it (e.g. maxmin, groupsort:4)"),
    ] = None,
) -> None:
    """Run the bounding tiers on one model: verified upper, lower, ratio, seconds, peak memory."""
    from lipsdp.compare import DEFAULT_TIERS, plot_comparison
    from lipsdp.compare import compare as run_compare

    tiers = tuple(methods) if methods else DEFAULT_TIERS
    try:
        with console.status("bounding...") as status:
            rows, lower_value = run_compare(
                path, tiers, budget=budget, seed=seed, **({} if activation is None else {"activation": activation}),
                on_done=lambda row: status.update(f"{row.method} done; running the next tier..."),
            )
    except LipSDPError as exc:
        _fail(_about(path, exc))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        ax = plot_comparison(rows, lower_value)
        ax.figure.tight_layout()
        ax.figure.savefig(plot, dpi=120)
    if as_json:
        print(json.dumps([
            dict(r.result.to_dict(), peak_mib=r.peak_bytes / 2**20) if r.result is not None
            else {"method": r.method, "error": r.error, "lower": lower_value, "seconds": r.seconds,
                  "peak_mib": r.peak_bytes / 2**20}
            for r in rows
        ], indent=2))
    else:
        print_table(
            [Column(c) for c in ("method", "upper (verified)", "lower", "upper/lower", "gap (proved)", "seconds",
                                 "peak MiB")],
            [
                [r.method, _fmt(r.result.upper), _fmt(r.result.lower), _fmt(r.result.ratio, 4),
                 _gap(r.result.gap), f"{r.seconds:.2f}", f"{r.peak_bytes / 2**20:.1f}"] if r.result is not None
                else [r.method, "failed", _fmt(lower_value), "-", "-", f"{r.seconds:.2f}", f"{r.peak_bytes / 2**20:.1f}"]
                for r in rows
            ],
            title=f"{path.name} (lower bound {_fmt(lower_value)})",
        )
        for r in rows:
            if r.result is None:
                console.print(f"{r.method} failed: {r.error}", highlight=False)
            elif (sentence := gap_sentence(r.result)) is not None:
                console.print(f"{r.method}: {sentence}", highlight=False)
    if all(r.result is None for r in rows):
        raise typer.Exit(1)


@app.command()
def methods() -> None:
    """List the available methods."""
    from lipsdp.methods import available_methods

    print_table(
        [Column("method", justify="left"), Column("what it computes", fold=True, justify="left")],
        [[name, desc] for name, desc in available_methods().items()],
    )


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
