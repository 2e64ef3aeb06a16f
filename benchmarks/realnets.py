"""Real-network benchmark: every tier on the trained FC nets of ../shared/realnets/fc and on seeded random
nets, beside the Jacobian lower bound and the peer ECLipsE-Fast (issue 9, item 7).

    python benchmarks/realnets.py [--nets SUBSTR ...] [--tiers naive layer ...] [--budget 60] [--timeout 600]
                                  [--threads N] [--json FILE] [--realnets DIR]
    python benchmarks/realnets.py --nets arch_acc --load 2          # quiet vs beside 2 busy processes

Nets: every `*.npz` in ../shared/realnets/fc (skipped with a note if the folder is absent) and the seeded
He-initialised ReLU nets [50,50x5,10], [50,50x20,10], [784,500x3,10] of benchmarks/scale.py.
Per net: the Jacobian lower bound (`lipsdp.lower.lower_bound`, the search `estimate(lower=True)` runs;
computed once), then every tier (naive, sequential, layer, neuron, anytime with --budget seconds): verified
upper bound, proven lower bound on the optimum of the LipSDP variant solved (`sdp_lower`, layer/neuron) and
the proven gap upper / sdp_lower - 1, seconds, peak MiB, status; then ECLipsE-Fast from the PyPI package
eclipse-nn (`pip install -e '.[bench]'`), whose number is NOT verified by lipsdp ('unverified').
After each net, check lines: `neuron <= layer <= sequential` (a promise of the product, 1e-9 relative
slack), the Jacobian lower bound below every verified upper bound, and ECLipsE-Fast's number against the
proven lower bounds.

Each run (net, tier) happens in a fresh (spawned) process, so the peak memory (max RSS of that process,
interpreter and imports included) is per run and a run over --timeout is killed (neuron/layer get a solver
time limit of 0.9 * --timeout, so they normally stop in time with a verified bound). Seconds are wall-clock
around the call only: the network is built and the method's modules (torch for anytime and ECLipsE) are
imported before the clock starts. --threads fixes the BLAS / torch threads of every run (default: lipsdp's
own rule, `lipsdp.threads.threads_for_sizes`, which ECLipsE-Fast gets as well).

--load N runs the chosen net (--nets must pick one) once quiet and once beside N CPU-bound busy-loop
processes, and prints both times and the loaded / quiet ratio per tier.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the seeded nets of benchmarks/scale.py
from scale import label, random_net

REPO = Path(__file__).resolve().parents[1]
REALNETS = REPO.parent / "shared" / "realnets" / "fc"
SEEDED = [
    [50] + [50] * 5 + [10],
    [50] + [50] * 20 + [10],
    [784] + [500] * 3 + [10],
]
TIERS = ["naive", "sequential", "layer", "neuron", "anytime"]
PEER = "eclipse-fast"
SLACK = 1e-9  # relative slack of the ordering checks


# -- the runs, each in its own process -------------------------------------------------------------


def _network(spec: dict):
    """Build the network a spec names: {'npz': path} or {'sizes': [...], 'seed': s}."""
    if "npz" in spec:
        from lipsdp.io import load_network

        return load_network(spec["npz"])
    return random_net(spec["sizes"], spec.get("seed", 0))


def _thread_count(net, threads: int | None) -> int:
    from lipsdp.threads import threads_for_sizes

    return threads_for_sizes(net.sizes, threads)


def _job_tier(net, method: str, options: dict, threads: int | None) -> dict:
    import lipsdp
    from lipsdp.methods import get_method

    get_method(method)  # import the method's module before the clock starts
    if method == "anytime":
        import torch  # noqa: F401
    start = time.perf_counter()
    res = lipsdp.estimate(net, method, threads=threads, **options)
    seconds = time.perf_counter() - start
    return {
        "bound": res.upper,
        "sdp_lower": res.sdp_lower,
        "gap": res.gap,
        "seconds": seconds,
        "status": res.status,
    }


def _job_lower(net, threads: int | None) -> dict:
    import torch  # noqa: F401 - imported before the clock starts (and so that its threads are limited)

    from lipsdp.lower import lower_bound
    from lipsdp.threads import limited_threads

    with limited_threads(_thread_count(net, threads)):
        start = time.perf_counter()
        lb = lower_bound(net)  # the defaults of estimate(lower=True): 512 samples, 100 ascent steps, seed 0
        seconds = time.perf_counter() - start
    return {"bound": lb.value, "seconds": seconds, "status": "ok"}


def _job_eclipse(net, threads: int | None) -> dict:
    try:
        import torch
        from eclipse_nn import LipConstEstimator
    except ImportError:
        return {"error": "eclipse-nn not installed (pip install -e '.[bench]')"}
    from lipsdp.threads import limited_threads

    # eclipse-nn (0.1.7) takes the (n_out, n_in) weight matrices as float64 tensors and one slope interval
    # [alpha_k, beta_k] per hidden layer (LipConstEstimator(weights=, alphas=, betas=); default [0, 1]), so
    # each net is passed with its own activation's bounds (sigmoid [0, 1/4]; relu, tanh, elu [0, 1]).
    # Calling it with [0, b] is the same as scaling W_k by b with slopes [0, 1]: its closed form only sees
    # m = (alpha + beta) / 2 and m^2 W_k X^-1 W_k^T. Caveat: ECLipsE_Fast ignores alpha * beta, so for
    # alpha > 0 (leaky ReLU) it bounds the net as if the slopes were [0, alpha + beta] (sound, looser), and
    # it refuses alpha < 0. lipsdp's slope bounds are per neuron; the layer's widest interval is passed.
    weights = [torch.from_numpy(np.array(w, dtype=np.float64)) for w in net.weights]
    alphas = [float(np.min(a)) for a in net.alphas]
    betas = [float(np.max(b)) for b in net.betas]
    estimator = LipConstEstimator(weights=weights, alphas=alphas, betas=betas)
    with limited_threads(_thread_count(net, threads)):
        start = time.perf_counter()
        value = estimator.estimate("ECLipsE_Fast")
        seconds = time.perf_counter() - start
    value = float(value)
    status = "unverified" if math.isfinite(value) and value > 0 else "failed: no positive finite value"
    return {"bound": value, "seconds": seconds, "status": status}


def _child(conn, spec: dict, job: str, args: tuple) -> None:
    try:
        net = _network(spec)
        if job == "tier":
            out = _job_tier(net, *args)
        elif job == "lower":
            out = _job_lower(net, *args)
        else:
            out = _job_eclipse(net, *args)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        out = {"error": f"{type(exc).__name__}: {exc}"}
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    conn.send(out)
    conn.close()


def run(spec: dict, job: str, args: tuple, timeout: float) -> dict:
    """One run in a fresh spawned process; {'error': ...} if it fails, dies or exceeds `timeout`."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, spec, job, args), daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            return parent.recv()
        return {"error": "timeout", "timeout": timeout}
    except EOFError:  # the child died without answering (killed for memory, a crash)
        proc.join()
        return {"error": f"died (exit code {proc.exitcode}) after {time.perf_counter() - start:.1f} s"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()


def tier_options(tier: str, args) -> dict:
    if tier in ("layer", "neuron"):
        return {"time_limit": 0.9 * args.timeout}
    if tier == "anytime":
        return {"budget": args.budget}
    return {}


# -- the nets --------------------------------------------------------------------------------------


def all_nets(realnets: Path) -> tuple[list[tuple[str, dict]], str | None]:
    nets, note = [], None
    if realnets.is_dir():
        nets = [(p.stem, {"npz": str(p)}) for p in sorted(realnets.glob("*.npz"))]
    else:
        note = f"realnets: {realnets} not found; its nets are skipped"
    nets += [(label(sizes), {"sizes": sizes, "seed": 0}) for sizes in SEEDED]
    return nets, note


def describe(spec: dict) -> str:
    return _network(spec).describe() + (f", seeded He init (seed {spec['seed']})" if "sizes" in spec else "")


# -- formatting ------------------------------------------------------------------------------------


def num(x: float | None) -> str:
    """A bound with 8 significant digits (never fewer than 6 shown, never cut)."""
    if x is None:
        return "-"
    text = format(x, "#.8g")  # '#': trailing zeros kept, so every bound shows 8 digits
    return text.removesuffix(".")


def at_most(a: float, b: float) -> bool:
    return a <= b * (1.0 + SLACK) if b >= 0 else a <= b * (1.0 - SLACK)


class Table:
    def __init__(self, name_width: int) -> None:
        self.w = max(name_width, 4) + 2
        self.header = (
            f"{'net':<{self.w}}{'tier':<14}{'bound':>16}  {'kind':<11}{'sdp_lower':>16}{'gap':>11}"
            f"{'bound/jac':>12}{'seconds':>10}{'peak MiB':>10}  status"
        )

    def row(self, name: str, tier: str, kind: str, out: dict, lower: float | None) -> str:
        if "error" in out:
            secs = f">{out['timeout']:g}" if out["error"] == "timeout" else "-"
            peak = f"{out['peak_mib']:.0f}" if "peak_mib" in out else "-"
            return (
                f"{name:<{self.w}}{tier:<14}{'-':>16}  {kind:<11}{'-':>16}{'-':>11}{'-':>12}{secs:>10}"
                f"{peak:>10}  {out['error']}"
            )
        bound = out["bound"]
        ratio = format(bound / lower, ".6g") if lower and lower > 0 else "-"
        gap = "-" if out.get("gap") is None else format(out["gap"], ".3g")
        return (
            f"{name:<{self.w}}{tier:<14}{num(bound):>16}  {kind:<11}{num(out.get('sdp_lower')):>16}{gap:>11}"
            f"{ratio:>12}{out['seconds']:>10.3f}{out['peak_mib']:>10.0f}  {out['status']}"
        )


def checks(tiers: dict[str, dict], lower: float | None, peer: dict | None) -> list[tuple[str, str]]:
    """(statement, verdict) pairs for one net."""
    ok = {t: o["bound"] for t, o in tiers.items() if "bound" in o}
    out = []
    chain = ["neuron", "layer", "sequential"]
    if all(t in ok for t in chain):
        n, l_, s = (ok[t] for t in chain)
        good = at_most(n, l_) and at_most(l_, s)
        verdict = "ok" if good else f"VIOLATED (neuron {num(n)}, layer {num(l_)}, sequential {num(s)})"
    else:
        verdict = "n/a (needs " + ", ".join(t for t in chain if t not in ok) + ")"
    out.append(("neuron <= layer <= sequential", verdict))
    if lower is not None and ok:
        bad = [f"{t} {num(v)}" for t, v in ok.items() if not at_most(lower, v)]
        out.append(
            (
                "jacobian lower <= every verified upper",
                "ok" if not bad else f"VIOLATED (lower {num(lower)} > {', '.join(bad)})",
            )
        )
    proven = [(t, o["sdp_lower"]) for t, o in tiers.items() if o.get("sdp_lower") is not None]
    neuron_lb = tiers.get("neuron", {}).get("sdp_lower")
    if neuron_lb is not None:  # every verified LipSDP-type bound is at least the LipSDP-Neuron optimum
        bad = [f"{t} {num(v)}" for t, v in ok.items() if t != "naive" and not at_most(neuron_lb, v)]
        out.append(
            (
                "neuron sdp_lower <= every LipSDP-type upper",
                "ok" if not bad else f"VIOLATED (sdp_lower {num(neuron_lb)} > {', '.join(bad)})",
            )
        )
    if peer is not None and "bound" in peer and peer["status"] == "unverified":
        value = peer["bound"]
        if lower is not None:
            out.append(
                (
                    f"{PEER} (unverified) >= jacobian lower",
                    "ok"
                    if at_most(lower, value)
                    else f"BELOW ({num(value)} < {num(lower)}: not an upper bound of this net)",
                )
            )
        if proven:
            # ECLipsE-Fast's multipliers are one per layer (l_k I): in exact arithmetic its value is at least
            # the LipSDP-Layer optimum, hence at least both proven lower bounds (layer's and neuron's).
            best_t, best = max(proven, key=lambda p: p[1])
            out.append(
                (
                    f"{PEER} (unverified) >= {best_t} sdp_lower",
                    "ok"
                    if at_most(best, value)
                    else f"BELOW ({num(value)} < {num(best)}: below the proven LipSDP-{best_t} optimum)",
                )
            )
    return out


# -- the two modes ---------------------------------------------------------------------------------


def table_mode(nets, args) -> None:
    tiers = [t for t in args.tiers if t in TIERS]
    peer = PEER in args.tiers
    table = Table(max(len(n) for n, _ in nets))
    print(
        f"budget {args.budget:g} s (anytime), timeout {args.timeout:g} s per run, "
        f"threads {args.threads or 'lipsdp default'}; '{PEER}' bounds are NOT verified by lipsdp"
    )
    print(table.header)
    print("-" * len(table.header), flush=True)
    records = []
    for name, spec in nets:
        print(f"# {name}: {describe(spec)}", flush=True)
        low = run(spec, "lower", (args.threads,), args.timeout)
        lower = low.get("bound")
        print(table.row(name, "jacobian", "lower", low, lower), flush=True)
        results = {}
        for tier in tiers:
            results[tier] = run(spec, "tier", (tier, tier_options(tier, args), args.threads), args.timeout)
            print(table.row(name, tier, "verified", results[tier], lower), flush=True)
        ecl = None
        if peer:
            ecl = run(spec, "eclipse", (args.threads,), args.timeout)
            print(table.row(name, PEER, "unverified", ecl, lower), flush=True)
        found = checks(results, lower, ecl)
        for statement, verdict in found:
            print(f"  {statement}: {verdict}", flush=True)
        records.append(
            {
                "net": name,
                "network": describe(spec),
                "jacobian_lower": low,
                "tiers": results,
                PEER: ecl,
                "checks": dict(found),
            }
        )
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1, default=float) + "\n")


def _busy(started, stop) -> None:
    """A CPU-bound busy loop until `stop` is set; `started` says it is spinning."""
    started.set()
    x = 0
    while not stop.is_set():
        for i in range(20000):
            x = (x * 31 + i) % 1000003


def load_mode(nets, args) -> None:
    exact = [(n, s) for n, s in nets if n in (args.nets or [])]
    nets = exact if len(exact) == 1 else nets
    if len(nets) != 1:
        names = ", ".join(n for n, _ in nets) or "none"
        sys.exit(f"--load needs --nets to pick exactly one net; it picks: {names}")
    name, spec = nets[0]
    tiers = [t for t in args.tiers if t in TIERS]
    print(
        f"# {name}: {describe(spec)}; quiet, then beside {args.load} busy-loop processes "
        f"(budget {args.budget:g} s, timeout {args.timeout:g} s, threads {args.threads or 'lipsdp default'})"
    )
    quiet = {t: run(spec, "tier", (t, tier_options(t, args), args.threads), args.timeout) for t in tiers}
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    started = [ctx.Event() for _ in range(args.load)]
    busy = [ctx.Process(target=_busy, args=(ev, stop), daemon=True) for ev in started]
    for p in busy:
        p.start()
    try:
        for ev, p in zip(started, busy):
            if not ev.wait(60.0):
                sys.exit(f"busy process {p.pid} did not start within 60 s")
        loaded = {t: run(spec, "tier", (t, tier_options(t, args), args.threads), args.timeout) for t in tiers}
    finally:
        stop.set()
        for p in busy:
            p.join(10.0)
            if p.is_alive():
                p.kill()
                p.join()
    w = max(len(name), 4) + 2
    header = (
        f"{'net':<{w}}{'tier':<12}{'quiet s':>10}{'loaded s':>10}{'loaded/quiet':>14}"
        f"{'bound quiet':>16}{'bound loaded':>16}"
    )
    print(header)
    print("-" * len(header))
    for t in tiers:
        q, lo = quiet[t], loaded[t]
        if "error" in q or "error" in lo:
            print(f"{name:<{w}}{t:<12}  quiet: {q.get('error', 'ok')}; loaded: {lo.get('error', 'ok')}")
            continue
        ratio = lo["seconds"] / q["seconds"] if q["seconds"] > 0 else math.inf
        print(
            f"{name:<{w}}{t:<12}{q['seconds']:>10.3f}{lo['seconds']:>10.3f}{ratio:>14.3f}"
            f"{num(q['bound']):>16}{num(lo['bound']):>16}"
        )
    if "anytime" in tiers:
        print(
            "(anytime uses its whole budget unless it converges: under load its bound, not its time, moves)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nets", nargs="+", default=None, help="keep nets whose name contains any of these")
    parser.add_argument("--tiers", nargs="+", default=TIERS + [PEER], choices=TIERS + [PEER])
    parser.add_argument("--budget", type=float, default=60.0, help="time budget of the anytime tier (s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit of every run (s)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS / torch threads of every run")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    parser.add_argument("--realnets", type=Path, default=REALNETS, help="folder of the real FC nets (*.npz)")
    parser.add_argument(
        "--load",
        type=int,
        default=None,
        metavar="N",
        help="time the chosen net quiet and beside N busy-loop processes",
    )
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.load is not None and args.load < 1:
        parser.error("--load must be at least 1")
    nets, note = all_nets(args.realnets)
    if note:
        print(note)
    if args.nets:
        nets = [(n, s) for n, s in nets if any(sub in n for sub in args.nets)]
    if args.load is not None:
        load_mode(nets, args)
        return
    if not nets:
        sys.exit("no net matches --nets")
    table_mode(nets, args)


if __name__ == "__main__":
    main()
