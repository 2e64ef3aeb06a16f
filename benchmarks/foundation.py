"""Foundation benchmark: verified bound, raw (unverified) bound and time of every method on seeded random
ReLU nets with He-initialised weights.

    python benchmarks/foundation.py [--max-seconds 300] [--seed 0]

Nets: [10, 20x5, 10], [50, 50x5, 10], [80, 100x5, 10] (input, five hidden layers, output).
Methods: naive, sequential, layer, neuron (default solver) and neuron with solver='scs'.

An SDP run whose LMI size (input + hidden neurons) exceeds what its solver handles (150 for Clarabel,
400 for SCS: beyond that the PSD cone's cost explodes in time and memory) is skipped. Which solver a
method uses by default is read off a run on a tiny net; a structure-exploiting default (the library's
own interior-point solver) has no size limit. Every SDP run happens in a child process with a memory
cap and is stopped after --max-seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from itertools import pairwise

import numpy as np

import lipsdp
from lipsdp import Network

NETS = {
    "[10,20x5,10]": [10] + [20] * 5 + [10],
    "[50,50x5,10]": [50] + [50] * 5 + [10],
    "[80,100x5,10]": [80] + [100] * 5 + [10],
}
RUNS = [("naive", None), ("sequential", None), ("layer", None), ("neuron", None), ("neuron", "scs")]
CHEAP = {"naive", "sequential"}  # no SDP: closed forms and eigenvalues only
LMI_LIMIT = {"clarabel": 150, "scs": 400}
MEMORY_CAP = 8 * 2**30  # bytes of address space a child may use


def he_network(sizes: list[int], seed: int) -> Network:
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0.0, np.sqrt(2.0 / a), size=(b, a)) for a, b in pairwise(sizes)]
    return Network.from_arrays(weights, "relu")


def lmi_size(net: Network) -> int:
    return net.sizes[0] + net.n_neurons


def _child(conn, net: Network, method: str, solver: str | None) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    except (ValueError, OSError):
        pass
    try:
        res = lipsdp.estimate(net, method, solver=solver)
        conn.send(("ok", res.upper, res.raw, res.seconds, res.solver))
    except MemoryError:
        conn.send(("error", "out of memory (cap 8 GiB)"))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def run_guarded(net: Network, method: str, solver: str | None, max_seconds: float) -> tuple:
    """Run one estimate in a child process; ('timeout',) if it takes longer than max_seconds."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, net, method, solver), daemon=True)
    proc.start()
    child.close()
    ready = parent.poll(max_seconds)
    out = parent.recv() if ready else ("timeout",)
    if proc.is_alive():
        proc.kill()
    proc.join()
    if not ready and proc.exitcode not in (None, 0, -9):
        out = ("error", f"child exited with code {proc.exitcode}")
    return out


def default_solver(method: str) -> str:
    """The solver `method` uses when none is named (e.g. 'clarabel', or the library's own IPM)."""
    return lipsdp.estimate(he_network([2, 3, 2], 0), method).solver or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop any SDP run after this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    defaults = {m: default_solver(m) for m, solver in RUNS if solver is None and m not in CHEAP}
    print("default solvers: " + ", ".join(f"{m}={s}" for m, s in defaults.items()))
    header = f"{'network':<15} {'LMI':>4}  {'method':<12} {'verified':>12} {'raw':>12} {'seconds':>9}  note"
    print(header)
    print("-" * len(header))
    for label, sizes in NETS.items():
        net = he_network(sizes, args.seed)
        size = lmi_size(net)
        for method, solver in RUNS:
            name = method + (f"/{solver}" if solver else "")
            prefix = f"{label:<15} {size:>4}  {name:<12}"
            if method in CHEAP:
                start = time.perf_counter()
                res = lipsdp.estimate(net, method)
                seconds = time.perf_counter() - start
                print(f"{prefix} {res.upper:>12.5f} {res.raw:>12.5f} {seconds:>9.2f}", flush=True)
                continue
            solver_name = solver or defaults[method]
            if size > LMI_LIMIT.get(solver_name, size):
                print(f"{prefix} {'-':>12} {'-':>12} {'-':>9}  skipped: too large for {solver_name}", flush=True)
                continue
            start = time.perf_counter()
            out = run_guarded(net, method, solver, args.max_seconds)
            seconds = time.perf_counter() - start
            if out[0] == "ok":
                _, upper, raw, _, used = out
                print(f"{prefix} {upper:>12.5f} {raw:>12.5f} {seconds:>9.2f}  solver {used}", flush=True)
            elif out[0] == "timeout":
                print(
                    f"{prefix} {'-':>12} {'-':>12} {'-':>9}  skipped: exceeded --max-seconds {args.max_seconds:g}",
                    flush=True,
                )
            else:
                print(f"{prefix} {'-':>12} {'-':>12} {seconds:>9.2f}  failed: {out[1]}", flush=True)


if __name__ == "__main__":
    main()
