"""Scale benchmark: every tier on seeded random ReLU nets, with time ratios to the dense CVXPY formulation.

    python benchmarks/scale.py [--dense-timeout 600] [--budget 100] [--only 0,1,2]

Each run happens in a fresh process (spawned) so peak memory (max RSS) is per run and a run that exceeds
its time limit is killed. Prints one table: net, method, verified bound, seconds, peak MiB, time / dense.
The dense reference is `neuron-dense` (the direct CVXPY formulation) with SCS, the faster of the two open
solvers on these sizes (Clarabel's cost grows with the square of the PSD cone's vectorised size; it is
tried as well where the LMI is small).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time

import numpy as np
from _process import run_spawned

NETS = [
    [50] + [50] * 2 + [10],
    [50] + [50] * 5 + [10],
    [50] + [50] * 10 + [10],
    [50] + [50] * 20 + [10],
    [80] + [100] * 5 + [10],
    [784, 100, 100, 10],
    [784, 500, 500, 500, 10],
]


def random_net(sizes: list[int], seed: int = 0):
    import lipsdp

    rng = np.random.default_rng(seed)
    weights = [rng.normal(0.0, np.sqrt(2.0 / a), size=(b, a)) for a, b in itertools.pairwise(sizes)]
    return lipsdp.Network.from_arrays(weights, "relu")


def _run(sizes, method, options, queue) -> None:
    import lipsdp

    net = random_net(sizes)
    start = time.perf_counter()
    try:
        res = lipsdp.estimate(net, method, **options)
    except lipsdp.LipSDPError as exc:
        queue.put(("error", str(exc)[:60]))
        return
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    queue.put((res.upper, seconds, peak, res.status))
    queue.close()
    queue.join_thread()


def run(sizes, method, options, timeout):
    return run_spawned(_run, (sizes, method, options), timeout)


def label(sizes):
    hidden = sizes[1:-1]
    if len(set(hidden)) == 1 and len(hidden) > 2:
        return f"[{sizes[0]},{hidden[0]}x{len(hidden)},{sizes[-1]}]"
    return "[" + ",".join(map(str, sizes)) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-timeout", type=float, default=600.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="limit for every other run")
    parser.add_argument("--budget", type=float, default=100.0, help="time budget of the anytime tier")
    parser.add_argument("--only", type=str, default=None, help="comma-separated indices into the net list")
    args = parser.parse_args()
    nets = NETS if args.only is None else [NETS[int(i)] for i in args.only.split(",")]
    header = f"{'net':<24}{'method':<22}{'verified':>14}{'seconds':>10}{'peak MiB':>10}{'t/dense':>10}  status"
    print(header)
    print("-" * len(header))
    for sizes in nets:
        size = sum(sizes[:-1])
        dense = {"max_lmi_size": 10**6}  # lift the library's refusal: the point here is to time it
        runs = [("neuron-dense (scs)", "neuron-dense", dict(dense, solver="scs"), args.dense_timeout)]
        if size <= 150:
            runs.append(("neuron-dense (clarabel)", "neuron-dense", dict(dense, solver="clarabel"), args.dense_timeout))
        runs += [
            ("neuron", "neuron", {"time_limit": args.timeout * 0.9}, args.timeout),
            ("anytime", "anytime", {"budget": args.budget}, args.timeout),
            ("sequential", "sequential", {}, args.timeout),
            ("naive", "naive", {}, args.timeout),
        ]
        dense_seconds = None
        for name, method, options, limit in runs:
            out = run(sizes, method, options, limit)
            if out is None:
                print(f"{label(sizes):<24}{name:<22}{'-':>14}{'>' + format(limit, '.0f'):>10}{'-':>10}{'-':>10}  timeout")
                continue
            if out[0] == "error":
                print(f"{label(sizes):<24}{name:<22}{'-':>14}{'-':>10}{'-':>10}{'-':>10}  error: {out[1]}")
                continue
            upper, seconds, peak, status = out
            if name == "neuron-dense (scs)":
                dense_seconds = seconds
            ratio = f"{seconds / dense_seconds:.3f}" if dense_seconds else "-"
            print(f"{label(sizes):<24}{name:<22}{upper:>14.6g}{seconds:>10.2f}{peak:>10.0f}{ratio:>10}  {status}", flush=True)


if __name__ == "__main__":
    main()
