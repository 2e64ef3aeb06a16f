"""CNN benchmark: the CIFAR-10 / MNIST CNNs of ../shared/realnets/cnn, each tier's verified bound, its time
and peak memory, and the VNN-LIB properties it certifies.

    python benchmarks/cnn.py [--nets cifar_base_kw resnet_2b Convnet_maxpool]
                             [--tiers naive sequential anytime] [--bounds global pair local] [--budget 240]
                             [--timeout 600] [--cnn DIR] [--props DIR] [--device cpu|cuda]

`--cnn DIR` reads the nets (NAME.onnx) from another folder, e.g. further VNN-COMP CNNs; a net with no
VNN-LIB folder (`--props DIR`/<its benchmark>, or DIR/NAME) gets its global bound only (`lipsdp estimate`),
with "certified" left empty.

Each (net, tier, bound) runs in a fresh spawned process (peak memory = its max RSS; a run past --timeout is
killed and reported as such). A run is `lipsdp certify NET PROPS --bound BOUND --method TIER`. global: one
verified bound L of the whole network, and a property counts as certified when every margin f_label - f_j
at the box centre exceeds sqrt(2) L times the box's l2 radius; "L" is that bound (read back from the
certificate). pair: a verified bound of each f_label - f_j on the whole input space, each pair solved once
and shared, per property smallest margin first until a class fails; "L" is the largest pair bound used.
local: a bound of each f_label - f_j valid on the property's box only (slopes tightened by interval
bounds), solved per property and class until one fails; "L" is then the largest local bound used.
Neither solves anything for a property beyond any Lipschitz margin ("L" is empty when all are).
"beyond any Lipschitz margin": properties for which a secant of some f_label - f_j inside the box
is already steeper than margin / radius, so that no Lipschitz bound can certify them
(`lipsdp.robustness.secant_floors`; pair and local solves are skipped there). "lower" is the largest
Jacobian norm `lipsdp.lower.lower_bound` finds (64 samples, 20 ascent steps), in its own process; it bounds the global L
from below. `--device` runs the anytime tier's descent there ('cuda' on a GPU; the default is the method's:
CUDA when available); "GPU MiB" is then torch's peak allocation on the card (the certificate is always
proved in float64 on the CPU).
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from pathlib import Path

from _process import run_spawned

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT.parent / "shared" / "realnets" / "cnn"
PROPS = ROOT.parent / "shared" / "realnets" / "vnnlib"
NETS = {"cifar_base_kw": "oval21", "resnet_2b": "resnet2b", "Convnet_maxpool": "maxpool"}


def _properties(props_dir: Path, net: str) -> list[Path]:
    """The VNN-LIB files of `net`: its benchmark's folder (NETS) or a folder named after it."""
    folder = props_dir / NETS.get(net, net)
    return sorted(folder.glob("*.vnnlib")) if folder.is_dir() else []


def _gpu_peak() -> float | None:
    """torch's peak allocation on the GPU in MiB, or None when CUDA was not used."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2.0**20


def _certify(cnn: Path, props_dir: Path, net: str, tier: str, bound: str, budget: float, device: str | None,
             queue) -> None:
    from lipsdp.robustness import certify_properties

    props = _properties(props_dir, net)
    options = {"budget": budget, "device": device} if tier == "anytime" else {}
    start = time.perf_counter()
    if not props:
        import lipsdp

        result = lipsdp.estimate(cnn / f"{net}.onnx", method=tier, **options)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        queue.put((result.upper, time.perf_counter() - start, peak, _gpu_peak(), None, None, 0))
        return
    results = certify_properties(cnn / f"{net}.onnx", props, method=tier, bound=bound, **options)
    seconds = time.perf_counter() - start
    bounds = [v for r in results for v in r.lipschitz.values()]
    upper = max(bounds) / (math.sqrt(2.0) if bound == "global" else 1.0) if bounds else float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    beyond = sum(r.beyond_reach is not None for r in results)
    queue.put((upper, seconds, peak, _gpu_peak(), sum(r.certified for r in results), beyond, len(results)))


def _lower(cnn: Path, net: str, queue) -> None:
    import lipsdp
    from lipsdp.lower import lower_bound

    start = time.perf_counter()
    value = lower_bound(lipsdp.load_network(cnn / f"{net}.onnx"), samples=64, steps=20).value
    queue.put((value, time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS))
    parser.add_argument("--tiers", nargs="+", default=["naive", "sequential", "anytime"])
    parser.add_argument("--bounds", nargs="+", default=["global"], choices=["global", "pair", "local"])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds of the anytime tier")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--lower-timeout", type=float, default=300.0)
    parser.add_argument("--cnn", type=Path, default=CNN, help="folder of the nets (NAME.onnx)")
    parser.add_argument("--props", type=Path, default=PROPS, help="folder of the VNN-LIB folders")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where the anytime tier runs (default: CUDA when available)")
    args = parser.parse_args()
    if not args.cnn.is_dir():
        raise SystemExit(f"{args.cnn} is absent")
    print("| net | tier | bound | verified L | lower | L / lower | s (bound + certification) | peak MiB | GPU MiB "
          "| certified | beyond any Lipschitz margin |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for net in args.nets:
        low = run_spawned(_lower, (args.cnn, net), args.lower_timeout)
        lower = low[0] if low else float("nan")
        for tier in args.tiers:
            for bound in args.bounds:
                if bound != "global" and not _properties(args.props, net):
                    continue  # pair and local bounds are solved for the properties' classes
                task = (args.cnn, args.props, net, tier, bound, args.budget, args.device)
                out = run_spawned(_certify, task, args.timeout)
                row = f"| {net} | {tier} | {bound} | "
                if out is None:
                    missing = f"no answer in {args.timeout:.0f} s | {lower:.4g} | - | - | - | - | - | - |"
                    print(row + missing, flush=True)
                    continue
                upper, seconds, peak, gpu, certified, beyond, total = out
                ratio = f"{upper / lower:.3g}" if bound == "global" else "-"
                counts = f"{certified}/{total} | {beyond}/{total}" if total else "- | -"
                gpu_mib = "-" if gpu is None else f"{gpu:.0f}"
                value = "(no solve needed)" if math.isnan(upper) else f"{upper:.6g}"
                cells = f"{value} | {lower:.4g} | {ratio} | {seconds:.1f} | {peak:.0f} | {gpu_mib} | {counts} |"
                print(row + cells, flush=True)


if __name__ == "__main__":
    main()
