"""Anytime tier against the exact LipSDP-Neuron optimum (issue 9, item 4: "anytime that uses its budget").

    python benchmarks/anytime.py [--budget 60] [--nets SUBSTR ...] [--threads 1]

Nets: every `*.npz` in ../shared/realnets/fc and the seeded He-initialised ReLU net [50,50x20,10] of
benchmarks/scale.py. Per net, one at a time and each in a fresh (spawned) process: `neuron` (the structured
interior point, the reference optimum; its proven lower bound `sdp_lower` beside it), then `anytime` with
--budget seconds. Prints the verified bounds, seconds, anytime's steps and why it stopped (from its notes),
anytime / neuron and anytime / sdp_lower (its proven distance to the optimum). Seconds are wall-clock around `lipsdp.estimate` only (imports done before).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _process import run_spawned
from scale import label, random_net

REALNETS = Path(__file__).resolve().parents[2] / "shared" / "realnets" / "fc"
SEEDED = [50] + [50] * 20 + [10]


def _run(model, method: str, options: dict, threads: int | None, queue) -> None:
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    import torch  # imported before the clock starts

    import lipsdp

    if threads is not None:
        torch.set_num_threads(threads)
    net = random_net(model) if isinstance(model, list) else lipsdp.load_network(model)
    start = time.perf_counter()
    res = lipsdp.estimate(net, method, **options)
    seconds = time.perf_counter() - start
    queue.put((res.upper, seconds, res.sdp_lower, res.status, list(res.notes)))


def run(model, method: str, options: dict, threads: int | None, timeout: float):
    return run_spawned(_run, (model, method, options, threads), timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="time budget of anytime (s)")
    parser.add_argument("--nets", nargs="+", default=None, help="keep nets whose name contains any of these")
    parser.add_argument("--threads", type=int, default=None, help="BLAS / torch threads of every run")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    nets = [(p.stem, str(p)) for p in sorted(REALNETS.glob("*.npz"))] + [(label(SEEDED), SEEDED)]
    if args.nets:
        nets = [(n, m) for n, m in nets if any(sub in n for sub in args.nets)]
    header = (
        f"{'net':<32}{'neuron':>12}{'s':>7}{'sdp_lower':>12}{'anytime':>12}{'s':>7}{'steps':>7}"
        f"{'anytime/neuron':>16}{'/sdp_lower':>12}  stopped"
    )
    print(header)
    print("-" * len(header))
    for name, model in nets:
        ref = run(model, "neuron", {}, args.threads, args.timeout)
        out = run(model, "anytime", {"budget": args.budget}, args.threads, args.timeout)
        if ref is None or out is None:
            print(f"{name:<32}  {'neuron' if ref is None else 'anytime'} did not finish in {args.timeout:.0f} s")
            continue
        note = next((n for n in out[4] if "quasi-Newton steps" in n), "")
        steps = re.match(r"(\d+) quasi-Newton", note)
        stopped = note.split("stopped: ", 1)[-1] if note else out[3]
        lower = f"{ref[2]:.7g}" if ref[2] else "-"
        gap = f"{out[0] / ref[2]:.5f}" if ref[2] else "-"
        print(
            f"{name:<32}{ref[0]:>12.7g}{ref[1]:>7.1f}{lower:>12}{out[0]:>12.7g}{out[1]:>7.1f}"
            f"{steps.group(1) if steps else '-':>7}{out[0] / ref[0]:>16.5f}{gap:>12}  {stopped}"
            + ("" if ref[3] == "optimal" else f"  (neuron: {ref[3]})"),
            flush=True,
        )


if __name__ == "__main__":
    main()
