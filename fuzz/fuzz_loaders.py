"""Fuzz the model loaders: mutate valid files of every format lipsdp reads and check that loading either
returns a valid Network or raises a LipSDPError, never another exception, and never kills the process.

    python fuzz/fuzz_loaders.py --seconds 60            # random mutations for 60 s, then a summary
    python fuzz/fuzz_loaders.py --seconds 10 --seed 3   # reproducible run
    python fuzz/fuzz_loaders.py --formats onnx,mat73    # only some formats

Formats: .npz, .mat (v5, scipy), .mat (v7.3, HDF5 via h5py), .onnx, .onnx.gz, .nnet and .vnnlib
(properties). Seeds are the bundled examples plus files written at start-up (v7.3 with the MATLAB-layout
writer of tests/matlab_v73.py, ONNX graphs built with onnx.helper, a small NNet and VNN-LIB text).

Mutations: bit flips, byte overwrites with boundary values, truncation, chunk duplication / deletion; and
structure-aware ones: for .npz a member's .npy header (random shape) or dtype; for ONNX a node's op or
attributes, an initializer's claimed dims or type, rewired edges, the input shape; for v7.3 a variable's
MATLAB_class, dtype, claimed shape, dangling or wrong references, links to other files; for text formats
a number replaced by an extreme value, lines dropped or duplicated.

Each input is loaded in a forked child (with an alarm), so a crash that escapes lipsdp's own isolation
(`lipsdp.io.isolation`) is recorded, not fatal. Outcomes: loaded, LipSDPError (of which "contained": a
parser crash, kill, timeout or memory exhaustion that lipsdp's isolation turned into a ModelLoadError),
other exception, killed by a signal, hang. A failing input is saved under fuzz/crashes/ with the traceback,
so it can become a test in tests/test_hostile.py.
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


INTERESTING_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e308", "1e-320", "99999999999", "2147483648", "",
                       "1,2", "0x10", "1e999", "-0", "3.5"]
MATLAB_CLASSES = ["cell", "char", "struct", "double", "single", "logical", "int8", "uint64",
                  "function_handle", "", "sparse", "string"]
ONNX_OPS = ["Relu", "Tanh", "Gemm", "MatMul", "Add", "Conv", "MaxPool", "AveragePool", "Reshape", "Flatten",
            "BatchNormalization", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Softmax", "NoSuchOp"]


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    """Line-level mutations of a text format: extreme numbers, dropped / duplicated / cut lines."""
    import re

    lines = data.decode("utf-8", errors="replace").split("\n")
    for _ in range(rng.randint(1, 4)):
        if not lines:
            break
        i = rng.randrange(len(lines))
        op = rng.randrange(4)
        if op == 0:
            numbers = list(re.finditer(r"-?\d+(\.\d+)?([eE]-?\d+)?", lines[i]))
            if numbers:
                m = rng.choice(numbers)
                lines[i] = lines[i][: m.start()] + rng.choice(INTERESTING_NUMBERS) + lines[i][m.end() :]
        elif op == 1:
            del lines[i]
        elif op == 2:
            lines.insert(i, lines[i])
        else:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
    return "\n".join(lines).encode()


def mutate_onnx_structure(data: bytes, rng: random.Random) -> bytes:
    """Edit the parsed graph: an op type, an attribute, an initializer's claimed dims or type, an edge,
    the input shape, or drop / duplicate a node. The result is a well-formed protobuf."""
    import onnx
    from onnx import AttributeProto, helper

    model = onnx.load_from_string(data)
    g = model.graph
    op = rng.randrange(7)
    if op == 0 and g.node:
        rng.choice(g.node).op_type = rng.choice(ONNX_OPS)
    elif op == 1 and g.initializer:
        t = rng.choice(g.initializer)
        del t.dims[:]
        t.dims.extend(rng.choice([[], [0], [2**31], [10**6, 10**6], [3, -1], [1, 1, 1, 1, 1], [2**62, 2]]))
    elif op == 2 and g.initializer:
        rng.choice(g.initializer).data_type = rng.choice([0, 2, 7, 8, 9, 10, 11, 16, 99])
    elif op == 3 and g.node:
        node = rng.choice(g.node)
        if node.attribute and rng.random() < 0.7:
            a = rng.choice(node.attribute)
            if a.type == AttributeProto.INT:
                a.i = rng.choice([-1, 0, 2, 2**31, -(2**40)])
            elif a.type == AttributeProto.INTS:
                del a.ints[:]
                a.ints.extend(rng.choice([[], [0], [-1, -1], [2**31, 1, 1, 1], [1] * 9]))
            elif a.type == AttributeProto.FLOAT:
                a.f = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
            else:
                a.type = rng.choice([AttributeProto.INT, AttributeProto.STRING, AttributeProto.TENSOR])
        else:
            name = rng.choice(["alpha", "axis", "pads", "strides", "kernel_shape", "transB", "group"])
            value = rng.choice([0, 1, -1, 2**40, [1, 2], [0, 0, 0, 0]])
            node.attribute.append(helper.make_attribute(name, value))
    elif op == 4 and g.node:
        node = rng.choice(g.node)
        names = [o for n in g.node for o in n.output] + [i.name for i in g.input] + ["missing"]
        names += [t.name for t in g.initializer]
        if node.input and rng.random() < 0.7:
            node.input[rng.randrange(len(node.input))] = rng.choice(names)
        elif node.output:
            node.output[0] = rng.choice(names)
    elif op == 5 and g.input:
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            d = rng.choice(dims)
            if rng.random() < 0.8:
                d.dim_value = rng.choice([0, 1, 3, 2**31, 10**9])
            else:
                d.dim_param = "N"
    elif g.node:
        i = rng.randrange(len(g.node))
        if rng.random() < 0.5:
            del g.node[i]
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(g.node[i])
            g.node.insert(i, copy)
    return model.SerializeToString()


def mutate_mat73_structure(data: bytes, rng: random.Random, tmp: Path) -> bytes:
    """Edit a v7.3 file with h5py: a MATLAB_class, a dataset's dtype or claimed shape, a reference to a
    group or to a deleted dataset, a soft or external link, MATLAB_empty, a missing variable."""
    import h5py

    path = tmp / "mutating.mat"
    path.write_bytes(data)
    with h5py.File(path, "r+") as f:
        names: list[str] = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        if not names:
            return data
        name = rng.choice(names)
        op = rng.randrange(7)
        if op == 0:
            f[name].attrs["MATLAB_class"] = np.bytes_(rng.choice(MATLAB_CLASSES))
        elif op in (1, 2):
            cls = f[name].attrs.get("MATLAB_class", np.bytes_("double"))
            del f[name]
            if op == 1:
                value = rng.choice([
                    np.zeros((0, 3)), np.array([[np.nan]]), np.ones(3), np.array([b"ab"]),
                    np.ones((2, 2), dtype=complex), np.ones((2, 2, 2)), np.array([[2.0**70]]),
                    np.arange(4, dtype=np.uint16).reshape(4, 1),
                ])
                ds = f.create_dataset(name, data=value)
            else:
                ds = f.create_dataset(name, shape=rng.choice([(2**20, 2**20), (2**31, 1), (0, 2**40)]),
                                      dtype="<f8", chunks=True if rng.random() < 0.5 else None)
            ds.attrs["MATLAB_class"] = cls
        elif op == 3 and "weights" in f and h5py.check_ref_dtype(f["weights"].dtype) is not None:
            refs = f["weights"][()]
            target = rng.choice([f.ref, f.require_group("#refs#").ref, f["weights"].ref])
            refs.reshape(-1)[rng.randrange(refs.size)] = target
            f["weights"][...] = refs
        elif op == 4:
            var = rng.choice(["weights", "biases", "activations"])
            if var in f:
                del f[var]
            f[var] = rng.choice([
                h5py.SoftLink("/" + var), h5py.SoftLink("/#refs#"), h5py.ExternalLink("/etc/passwd", "x"),
                h5py.ExternalLink(str(path), "/weights"),
            ])
        elif op == 5:
            f[name].attrs["MATLAB_empty"] = np.uint8(1)
        else:
            del f[name]  # a variable gone, or a reference left dangling
    return path.read_bytes()


def _onnx_seeds() -> list[bytes]:
    """Two graphs built with onnx.helper: an MLP (Gemm / Relu) and a small CNN (Conv, BatchNorm, pooling)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(nodes, input_shape, inits) -> bytes:
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "out"])],
            [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name=k) for k, v in inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model.SerializeToString()

    with np.load(ROOT / "examples" / "relu_2-10-30-20-2.npz") as z:
        ws = [z[f"W{k}"] for k in range(4)]
    nodes, inits, prev = [], {}, "x"
    for k, w in enumerate(ws):
        inits[f"w{k}"], inits[f"b{k}"] = w, np.zeros(w.shape[0])
        out = "y" if k == len(ws) - 1 else f"h{k}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{k}", f"b{k}"], [out], transB=1))
        if k < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"a{k}"]))
            prev = f"a{k}"
    mlp = save(nodes, [2], inits)
    rng = np.random.default_rng(0)
    cnn_nodes = [
        helper.make_node("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["bn"], epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w", "wb"], ["g"], transB=1),
        helper.make_node("Tanh", ["g"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["mm"]),
        helper.make_node("Add", ["mm", "b2"], ["y"]),
    ]
    cnn_inits = {
        "k": rng.standard_normal((2, 1, 3, 3)), "kb": rng.standard_normal(2), "s": np.ones(2), "o": np.zeros(2),
        "m": rng.standard_normal(2), "v": np.ones(2) * 2, "w": rng.standard_normal((5, 18)), "wb": np.zeros(5),
        "w2": rng.standard_normal((5, 3)), "b2": np.zeros(3),
    }
    cnn = save(cnn_nodes, [1, 6, 6], cnn_inits)
    onnx.load_from_string(mlp)
    return [mlp, cnn]


def _nnet_seed() -> bytes:
    """The tanh controller's sizes with ReLU, as an NNet text file (normalisation included)."""
    with np.load(ROOT / "examples" / "tanh_controller.npz") as z:
        ws = [z[f"W{k}"] for k in range(3)]
        bs = [z[f"b{k}"] for k in range(3)]
    sizes = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    n_in = sizes[0]

    def row(values: list) -> str:
        return ",".join(map(str, values)) + ","

    lines = ["// fuzz seed", row([len(ws), n_in, sizes[-1], max(sizes)]), row(sizes), "0,", row([-1.0] * n_in),
             row([1.0] * n_in), row([0.0] * (n_in + 1)), row([1.0] * (n_in + 1))]
    for w, b in zip(ws, bs):
        lines += [",".join(f"{v:.17g}" for v in r) + "," for r in w]
        lines += [f"{v:.17g}," for v in b]
    return ("\n".join(lines) + "\n").encode()


VNNLIB_SEED = b"""; fuzz seed: robustness of class 0 on a box
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (>= X_0 -1.0))
(assert (<= X_0 1.0))
(assert (>= X_1 -0.5))
(assert (<= X_1 0.5))
(assert (or (and (>= Y_1 Y_0))))
"""


def make_seeds(tmp: Path) -> list[tuple[str, str, bytes]]:
    """(format, suffix, bytes) of every seed file."""
    import gzip

    sys.path.insert(0, str(ROOT / "tests"))
    from matlab_v73 import write_network

    from lipsdp import load_network

    seeds = [("npz", p.suffix, p.read_bytes()) for p in SEEDS if p.suffix == ".npz"]
    seeds += [("mat5", p.suffix, p.read_bytes()) for p in SEEDS if p.suffix == ".mat"]
    for name in ("relu_2-10-30-20-2", "tanh_controller"):
        path = tmp / f"{name}-v73.mat"
        write_network(path, load_network(ROOT / "examples" / f"{name}.npz"))
        seeds.append(("mat73", ".mat", path.read_bytes()))
    for graph in _onnx_seeds():
        seeds += [("onnx", ".onnx", graph), ("onnx.gz", ".onnx.gz", gzip.compress(graph))]
    seeds += [("nnet", ".nnet", _nnet_seed()), ("vnnlib", ".vnnlib", VNNLIB_SEED)]
    return seeds


def mutate(fmt: str, data: bytes, rng: random.Random, tmp: Path) -> bytes:
    """One mutated input of the given format."""
    import gzip

    if fmt == "npz" and rng.random() < 0.4:
        return mutate_npz_structure(data, rng)
    if fmt == "mat73" and rng.random() < 0.6:
        return mutate_mat73_structure(data, rng, tmp)
    if fmt == "onnx" and rng.random() < 0.6:
        return mutate_onnx_structure(data, rng)
    if fmt == "onnx.gz" and rng.random() < 0.7:
        inner = gzip.decompress(data)
        inner = mutate_onnx_structure(inner, rng) if rng.random() < 0.6 else mutate_bytes(inner, rng)
        return gzip.compress(inner)
    if fmt in ("nnet", "vnnlib") and rng.random() < 0.6:
        return mutate_text(data, rng)
    return mutate_bytes(data, rng)


# Messages of the ModelLoadErrors that lipsdp.io.isolation makes of a dead, stopped or starved parser.
CONTAINED = ("crashed with", "was killed", "did not finish within", "memory limit", "without a result",
             "CPU time limit")


def check_one(path: Path, fmt: str) -> tuple[str, str]:
    """('ok', '') for a valid Network or property, ('error', message) for a LipSDPError, ('contained',
    message) for a parser crash that lipsdp's isolation turned into a ModelLoadError; or raises whatever
    else escaped."""
    from lipsdp import LipSDPError, Network, load_network

    try:
        if fmt == "vnnlib":
            from lipsdp.io.vnnlib import VnnlibProperty, read_vnnlib

            assert isinstance(read_vnnlib(path), VnnlibProperty)
            return "ok", ""
        net = load_network(path)
    except LipSDPError as exc:
        return ("contained" if any(text in str(exc) for text in CONTAINED) else "error"), str(exc)
    assert isinstance(net, Network)
    assert all(np.all(np.isfinite(w)) for w in net.weights)
    for a, b in zip(net.weights[:-1], net.weights[1:]):
        assert b.shape[1] == a.shape[0]
    return "ok", ""


CODES = {"ok": 0, "error": 3, "contained": 5}


def run_in_fork(path: Path, fmt: str, alarm: int) -> tuple[str, str]:
    """Load in a forked child (ended by SIGALRM after `alarm` s), so that a segfault that escapes lipsdp's
    own isolation is recorded instead of ending the run."""
    import signal

    report = path.with_suffix(".traceback")
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            signal.alarm(alarm)
            outcome, message = check_one(path, fmt)
            code = CODES[outcome]
            if outcome == "contained":
                report.write_text(message)
        except BaseException:  # noqa: BLE001 - exactly what the fuzzer hunts for
            report.write_text(traceback.format_exc())
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) == signal.SIGALRM:
            return "hang", f"still loading after {alarm} s\n"
        return "signal", f"killed by signal {os.WTERMSIG(status)} while loading\n"
    code = os.WEXITSTATUS(status)
    detail = ""
    if code in (4, CODES["contained"]) and report.exists():
        detail = report.read_text()
        report.unlink()
    if code == 4:
        return "crash", detail
    return {v: k for k, v in CODES.items()}.get(code, "crash"), detail


OUTCOMES = ("ok", "error", "contained", "crash", "signal", "hang")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget")
    parser.add_argument("--seed", type=int, default=0, help="random seed (reproducible runs)")
    parser.add_argument(
        "--formats", default="", help="comma-separated subset of: npz,mat5,mat73,onnx,onnx.gz,nnet,vnnlib"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="print each contained parser failure")
    parser.add_argument(
        "--crashes", type=Path, default=ROOT / "fuzz" / "crashes", help="where failing inputs go"
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    # Tight limits for lipsdp's isolated parsers: a hostile input must not stall the run or the machine.
    os.environ.setdefault("LIPSDP_LOAD_TIMEOUT", "10")
    os.environ.setdefault("LIPSDP_LOAD_MEMORY_GIB", "2")
    rng = random.Random(args.seed)
    import h5py  # noqa: F401 - import once in the parent so that forks start warm
    import onnx  # noqa: F401
    import scipy.io  # noqa: F401

    import lipsdp.io.arrays
    import lipsdp.io.mat73
    import lipsdp.io.onnx_model  # noqa: F401

    counts: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        seeds = make_seeds(tmp)
        if args.formats:
            wanted = set(args.formats.split(","))
            seeds = [s for s in seeds if s[0] in wanted]
            if not seeds:
                parser.error(f"no seeds for formats {args.formats}")
        for fmt, suffix, data in seeds:  # every seed must load, or the fuzzer only tests error paths
            path = tmp / f"seed{suffix}"
            path.write_bytes(data)
            outcome, _ = check_one(path, fmt)
            if outcome != "ok":
                print(f"warning: a {fmt} seed does not load ({outcome})", file=sys.stderr)
        deadline = time.monotonic() + args.seconds
        i = 0
        while time.monotonic() < deadline:
            fmt, suffix, data = rng.choice(seeds)
            mutated = mutate(fmt, data, rng, tmp)
            path = tmp / f"case{i}{suffix}"
            path.write_bytes(mutated)
            outcome, detail = run_in_fork(path, fmt, alarm=60)
            per = counts.setdefault(fmt, dict.fromkeys(OUTCOMES, 0))
            per[outcome] += 1
            if outcome in ("crash", "signal", "hang"):
                args.crashes.mkdir(parents=True, exist_ok=True)
                target = args.crashes / f"seed{args.seed}-case{i}{suffix}"
                target.write_bytes(mutated)
                Path(str(target) + ".txt").write_text(detail)
                print(f"{outcome.upper()} {target}: {detail.strip().splitlines()[-1]}", file=sys.stderr)
            elif outcome == "contained" and args.verbose:
                print(f"contained ({fmt}): {detail.strip()}", file=sys.stderr)
            path.unlink()
            i += 1
    total = {o: sum(c[o] for c in counts.values()) for o in OUTCOMES}
    print(f"{i} inputs in {args.seconds:g} s (seed {args.seed}):")
    print(f"  {'format':<8} {'inputs':>7} {'loaded':>7} {'LipSDPError':>12} {'(contained)':>12} "
          f"{'other exc':>10} {'signal':>7} {'hang':>5}")
    for fmt, c in sorted(counts.items()) + [("all", total)]:
        print(f"  {fmt:<8} {sum(c.values()):>7} {c['ok']:>7} {c['error'] + c['contained']:>12} "
              f"{c['contained']:>12} {c['crash']:>10} {c['signal']:>7} {c['hang']:>5}")
    print("contained: a parser crash, kill, timeout or memory exhaustion that lipsdp isolated and reported as "
          "a ModelLoadError; other exc / signal / hang are bugs (inputs saved under --crashes)")
    return 1 if total["crash"] or total["signal"] or total["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
