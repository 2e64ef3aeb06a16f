"""Hostile and broken model files: every one gives a clear LipSDPError (never another exception), and
nothing is allocated for sizes a header merely claims, nor is code from a file ever executed."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import scipy.io
from conftest import EXAMPLES

import lipsdp
from lipsdp import LipSDPError, ModelLoadError, load_network


def huge_npz(path, shape=(10**6, 10**6)):
    """A 200-byte .npz whose W0 header claims a 10^6 x 10^6 float64 array (8 TB)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    buf.write(b"\0" * 64)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("W0.npy", buf.getvalue())
        out = io.BytesIO()
        np.save(out, np.ones((1, 3)))
        zf.writestr("W1.npy", out.getvalue())


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def cell(*arrays):
    c = np.empty((1, len(arrays)), dtype=object)
    for i, a in enumerate(arrays):
        c[0, i] = a
    return c


def bad_header_npz(path):
    """Found by fuzz/fuzz_loaders.py (seed 1): an unbalanced header made numpy raise tokenize.TokenError."""
    text = b"{'descr': '<f8', 'fortran_order': False, 'shape': (3, \n"
    header = np.lib.format.MAGIC_PREFIX + b"\x01\x00" + len(text).to_bytes(2, "little") + text
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("W0.npy", header + b"\0" * 24)


NPZ_CASES = {
    "bad-header-tokens": bad_header_npz,
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes((EXAMPLES / "relu_2-10-30-20-2.npz").read_bytes()[:700]),
    "text": lambda p: p.write_text("hello, not a zip"),
    "huge-header": huge_npz,
    "non-chain": lambda p: np.savez(p, W0=np.ones((3, 4)), W1=np.ones((5, 7))),
    "object-array": lambda p: np.savez(p, W0=np.array([np.ones(2), np.ones(3)], dtype=object)),
    "single-npy": lambda p: p.write_bytes(_npy_bytes(np.ones(3))),
    "strings": lambda p: np.savez(p, W0=np.array([["a", "b"]])),
    "unknown-activation": lambda p: np.savez(
        p, W0=np.ones((3, 2)), W1=np.ones((1, 3)), activations=np.array(["swish"])
    ),
    "3-d": lambda p: np.savez(p, W0=np.ones((3, 2, 2))),
    "complex": lambda p: np.savez(p, W0=np.ones((3, 2), dtype=complex)),
    "empty-matrix": lambda p: np.savez(p, W0=np.ones((0, 2))),
    "nan": lambda p: np.savez(p, W0=np.full((2, 2), np.nan)),
    "gap": lambda p: np.savez(p, W0=np.ones((2, 2)), W2=np.ones((2, 2))),
    "no-weights": lambda p: np.savez(p, x=np.ones(2)),
    "bias-mismatch": lambda p: np.savez(
        p, W0=np.ones((3, 2)), W1=np.ones((1, 3)), b0=np.ones(4), b1=np.ones(1)
    ),
}

MAT_CASES = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes((EXAMPLES / "relu_2-10-30-20-2.mat").read_bytes()[:400]),
    "text": lambda p: p.write_text("MATLAB 5.0 MAT-file, but garbage afterwards"),
    "no-weights": lambda p: scipy.io.savemat(p, {"x": np.ones(3)}),
    "non-chain": lambda p: scipy.io.savemat(p, {"weights": cell(np.ones((3, 4)), np.ones((5, 7)))}),
    "string-cell": lambda p: scipy.io.savemat(p, {"weights": cell(np.array(["x"]), np.ones((5, 7)))}),
    "struct": lambda p: scipy.io.savemat(p, {"weights": {"a": np.ones(2)}}),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_hostile_npz(case, tmp_path):
    path = tmp_path / f"{case}.npz"
    NPZ_CASES[case](path)
    with pytest.raises(LipSDPError) as info:
        load_network(path)
    assert str(path) in str(info.value) or path.name in str(info.value)


def test_huge_header_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.npz"
    huge_npz(path)
    with pytest.raises(ModelLoadError, match=r"claims shape \(1000000, 1000000\)"):
        load_network(path)


@pytest.mark.parametrize("case", sorted(MAT_CASES))
def test_hostile_mat(case, tmp_path):
    path = tmp_path / f"{case}.mat"
    MAT_CASES[case](path)
    with pytest.raises(LipSDPError):
        load_network(path)


def test_torch_files_are_refused_without_unpickling(tmp_path):
    """A pickle that would run code if loaded: lipsdp refuses the file type before opening it."""
    import pickle

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for suffix in (".pt", ".pth"):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(pickle.dumps(Evil()))
        with pytest.raises(ModelLoadError, match="weights_only=True"):
            load_network(path)
    assert not marker.exists()


def test_npz_with_pickled_object_never_unpickles(tmp_path):
    import pickle

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    arr = np.empty(1, dtype=object)
    arr[0] = Evil()
    path = tmp_path / "evil.npz"
    np.savez(path, W0=arr)
    with pytest.raises(ModelLoadError):
        load_network(path)
    assert not marker.exists()
    assert pickle  # the payload really is a pickle (np.savez pickles object arrays)


def test_two_output_heads_torch_module_is_refused():
    """A policy with two heads is not a chain: the torch loader must say so, not guess."""
    import torch
    from torch import nn

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.mean = nn.Linear(4, 2)
            self.value = nn.Linear(4, 1)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.mean(h), self.value(h)

    with pytest.raises(LipSDPError):
        lipsdp.estimate(TwoHeads(), "naive")


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        load_network(tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        load_network(tmp_path / "nope.npz")


ONNX_CASES = {
    "empty": b"",
    "garbage": bytes(range(256)) * 3,
    "truncated": None,  # half of a valid export, made in the test
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_hostile_onnx(case, tmp_path):
    pytest.importorskip("onnx")
    try:
        import lipsdp.io.onnx_model  # noqa: F401
    except ImportError:
        pytest.skip("no ONNX loader in this build")
    path = tmp_path / f"{case}.onnx"
    if case == "truncated":
        import torch
        from torch import nn

        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        full = tmp_path / "full.onnx"
        torch.onnx.export(model, torch.zeros(1, 3), str(full), dynamo=False)
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(ONNX_CASES[case])
    with pytest.raises(LipSDPError):
        load_network(path)


def _onnx_mlp(path, edit) -> None:
    """A one-layer Gemm graph, then `edit(initializer)` (the kind of change fuzz/fuzz_loaders.py makes)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), name="w")
    edit(w)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


def _claim_dims(tensor) -> None:  # fewer elements than the data holds: the ONNX checker lets it pass
    del tensor.dims[:]
    tensor.dims.extend([1, 3])


@pytest.mark.parametrize("edit", [_claim_dims, lambda t: setattr(t, "data_type", 99)], ids=["dims", "dtype"])
def test_onnx_initializer_that_does_not_match_its_data(tmp_path, edit):
    """Found by fuzz/fuzz_loaders.py (seed 1): numpy_helper.to_array raised ValueError / KeyError."""
    path = tmp_path / "init.onnx"
    _onnx_mlp(path, edit)
    with pytest.raises(ModelLoadError, match="initializer 'w' is unreadable"):
        load_network(path)


def test_onnx_batchnorm_with_parameters_of_other_sizes(tmp_path):
    """Found by fuzz/fuzz_loaders.py (seed 0): a BatchNormalization whose mean was a conv kernel raised a
    numpy broadcasting ValueError."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = {"s": np.ones(2), "o": np.zeros(2), "m": np.ones((2, 1, 3, 3)), "v": np.ones(2)}
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "s", "o", "m", "v"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name=k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "bn.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="2, 2, 18 and 2 entries"):
        load_network(path)
