"""Fuzz the model loaders: mutate valid example files and check that loading either returns a valid
Network or raises a LipSDPError, never another exception (and never hangs or allocates absurd memory).

    python fuzz/fuzz_loaders.py --seconds 60            # random mutations for 60 s, then a summary
    python fuzz/fuzz_loaders.py --seconds 10 --seed 3   # reproducible run

Mutations: bit flips, byte overwrites with boundary values, truncation, chunk duplication / deletion,
and (for .npz) rewriting one member's .npy header with a random shape. A failing input is saved under
fuzz/crashes/ with the traceback, so it can become a test in tests/test_hostile.py.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [
    ROOT / "examples" / "relu_2-10-30-20-2.npz",
    ROOT / "examples" / "relu_2-10-30-20-2.mat",
    ROOT / "examples" / "tanh_controller.npz",
    ROOT / "examples" / "tanh_controller.mat",
]
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, ord("("), ord(")"), ord(","), ord("9")]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        if not buf:
            break
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.choice(INTERESTING)
        elif op == 2:
            del buf[rng.randrange(len(buf)) :]
        elif op == 3:
            j = min(len(buf), i + rng.randint(1, 64))
            buf[i:i] = buf[i:j]
        else:
            j = min(len(buf), i + rng.randint(1, 64))
            del buf[i:j]
    return bytes(buf)


def mutate_npz_structure(data: bytes, rng: random.Random) -> bytes:
    """Rewrite one member of a valid .npz: random shape in the header, random dtype, or drop / rename it."""
    src = zipfile.ZipFile(io.BytesIO(data))
    names = src.namelist()
    victim = rng.choice(names)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in names:
            raw = src.read(name)
            if name == victim:
                op = rng.randrange(4)
                if op == 0:
                    ndim = rng.randint(0, 3)
                    shape = tuple(rng.choice([0, 1, 2, 3, 7, 10**6, 2**40]) for _ in range(ndim))
                    hdr = io.BytesIO()
                    np.lib.format.write_array_header_1_0(
                        hdr, {"descr": "<f8", "fortran_order": False, "shape": shape}
                    )
                    raw = hdr.getvalue() + raw[128:][: rng.randint(0, 4096)]
                elif op == 1:
                    arr = np.load(io.BytesIO(raw), allow_pickle=False)
                    dtype = rng.choice(["<f4", "<i8", "|b1", "<c16", "<U3", "<f2"])
                    try:
                        arr = arr.astype(dtype)
                    except (TypeError, ValueError):
                        pass
                    buf = io.BytesIO()
                    np.save(buf, arr)
                    raw = buf.getvalue()
                elif op == 2:
                    continue
                else:
                    name = rng.choice(["W9.npy", "b0.npy", "activations.npy", "W.npy", "W01.npy"])
            dst.writestr(name, raw)
    return out.getvalue()


def check_one(path: Path) -> str:
    """'ok' (valid Network), 'error' (LipSDPError) or raises whatever else escaped."""
    from lipsdp import LipSDPError, Network, load_network

    try:
        net = load_network(path)
    except LipSDPError:
        return "error"
    assert isinstance(net, Network)
    assert all(np.all(np.isfinite(w)) for w in net.weights)
    for a, b in zip(net.weights[:-1], net.weights[1:]):
        assert b.shape[1] == a.shape[0]
    return "ok"


def run_isolated(path: Path) -> tuple[str, str]:
    """Load in a forked child, so that a segfault in a C parser is recorded instead of ending the run."""
    report = path.with_suffix(".traceback")
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            code = {"ok": 0, "error": 3}[check_one(path)]
        except BaseException:  # noqa: BLE001 - exactly what the fuzzer hunts for
            report.write_text(traceback.format_exc())
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "signal", f"killed by signal {os.WTERMSIG(status)} while loading\n"
    code = os.WEXITSTATUS(status)
    if code == 4:
        detail = report.read_text()
        report.unlink()
        return "crash", detail
    return ("ok" if code == 0 else "error"), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget")
    parser.add_argument("--seed", type=int, default=0, help="random seed (reproducible runs)")
    parser.add_argument(
        "--crashes", type=Path, default=ROOT / "fuzz" / "crashes", help="where failing inputs go"
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    rng = random.Random(args.seed)
    seeds = [(p.suffix, p.read_bytes()) for p in SEEDS if p.exists()]
    counts = {"ok": 0, "error": 0, "crash": 0, "signal": 0}
    import scipy.io  # noqa: F401

    import lipsdp.io.arrays  # noqa: F401 - import once in the parent so that forks start warm

    deadline = time.monotonic() + args.seconds
    with tempfile.TemporaryDirectory() as tmp:
        i = 0
        while time.monotonic() < deadline:
            suffix, data = rng.choice(seeds)
            if suffix == ".npz" and rng.random() < 0.4:
                mutated = mutate_npz_structure(data, rng)
            else:
                mutated = mutate_bytes(data, rng)
            path = Path(tmp) / f"case{i}{suffix}"
            path.write_bytes(mutated)
            outcome, detail = run_isolated(path)
            counts[outcome] += 1
            if outcome in ("crash", "signal"):
                args.crashes.mkdir(parents=True, exist_ok=True)
                target = args.crashes / f"seed{args.seed}-case{i}{suffix}"
                target.write_bytes(mutated)
                target.with_suffix(target.suffix + ".txt").write_text(detail)
                print(f"{outcome.upper()} {target}: {detail.strip().splitlines()[-1]}", file=sys.stderr)
            path.unlink()
            i += 1
    print(
        f"{i} inputs in {args.seconds:g} s: {counts['ok']} loaded, {counts['error']} LipSDPError, "
        f"{counts['crash']} other exceptions, {counts['signal']} killed by a signal (e.g. a segfault in a C parser)"
    )
    return 1 if counts["crash"] or counts["signal"] else 0


if __name__ == "__main__":
    sys.exit(main())
