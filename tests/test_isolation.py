"""Crash isolation of untrusted parsers: a segfault, a kill, a timeout or memory exhaustion while reading a
file becomes one ModelLoadError naming the file; the calling process (and a batch run) goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT

import lipsdp
from lipsdp import LipSDPError, ModelLoadError, load_network
from lipsdp.io.isolation import isolation_available, run_isolated

pytestmark = pytest.mark.skipif(not isolation_available(), reason="needs os.fork (parsing runs in-process)")

SEGFAULTS = sorted((ROOT / "fuzz" / "scipy-segfaults").glob("*.mat"))
CLI = [sys.executable, "-c", "from lipsdp.cli import main; main()"]


def test_the_kept_segfault_inputs_exist():
    assert len(SEGFAULTS) >= 2


@pytest.mark.parametrize("path", SEGFAULTS, ids=lambda p: p.name)
def test_scipy_segfault_becomes_a_clear_error(path):
    """These files kill any process that hands them to scipy.io.loadmat; here the test process survives.
    scipy reads memory it should not on them, so it usually segfaults but may instead raise a parse error
    (case641 does about one time in ten): both must end as a ModelLoadError naming the file."""
    with pytest.raises(ModelLoadError) as info:
        load_network(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "crashed with SIGSEGV" in message or "not a readable MATLAB .mat file" in message, message


def test_batch_with_a_hostile_file_keeps_the_good_result(tmp_path):
    bad = tmp_path / "bad.mat"
    bad.write_bytes((ROOT / "fuzz" / "scipy-segfaults" / "seed0-case757.mat").read_bytes())  # segfaults each time
    good = EXAMPLES / "relu_2-10-30-20-2.npz"
    out = tmp_path / "r.jsonl"
    proc = subprocess.run(
        CLI + ["estimate", str(bad), str(good), "-m", "naive", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 2, proc.stderr  # not 139: the segfault happened in a child
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:") and "bad.mat" in errors[0], proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = lipsdp.estimate(good, "naive").upper
    assert [r["model"] for r in rows] == [str(good)] and rows[0]["upper"] == expected
    assert f"{expected:.6g}" in proc.stdout  # the table still shows the good model


def test_batch_error_without_out_prints_the_others(tmp_path):
    from typer.testing import CliRunner

    from lipsdp.cli import app

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf" * 10)
    good = EXAMPLES / "tanh_controller.npz"
    res = CliRunner().invoke(app, ["estimate", str(good), str(bad), "-m", "naive", "--json"])
    assert res.exit_code == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "broken.onnx" in res.stderr
    data = json.loads(res.stdout)
    assert [d["model"] for d in data] == [str(good)]


# The mechanism, with functions that misbehave on purpose.

def _returns_arrays(path: Path, scale: float = 1.0) -> dict:
    return {"pid": os.getpid(), "w": np.arange(6.0).reshape(2, 3) * scale, "name": path.name}


def test_result_comes_back_from_a_child(tmp_path):
    out = run_isolated(_returns_arrays, tmp_path / "x.bin", 2.0)
    assert out["pid"] != os.getpid()
    assert out["name"] == "x.bin" and out["w"].tolist() == [[0, 2, 4], [6, 8, 10]]


def test_in_process_where_isolation_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPSDP_ISOLATE", "0")
    assert run_isolated(_returns_arrays, tmp_path / "x.bin")["pid"] == os.getpid()


def _allocates(path: Path, nbytes: int) -> int:
    return len(bytearray(nbytes))


def test_memory_limit_gives_a_clear_error(tmp_path):
    assert run_isolated(_allocates, tmp_path / "m.bin", 2**20, memory=64 * 2**20) == 2**20
    with pytest.raises(ModelLoadError, match=r"m\.bin: .*more than the 0\.0625 GiB memory limit"):
        run_isolated(_allocates, tmp_path / "m.bin", 2**30, memory=64 * 2**20)


def _blocks_forever(path: Path) -> None:
    threading.Event().wait()  # never set: only the time limit ends this


def test_time_limit_gives_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"t\.bin: .*did not finish within 0\.2 s"):
        run_isolated(_blocks_forever, tmp_path / "t.bin", timeout=0.2)


def _kills_itself(path: Path, sig: int) -> None:
    os.kill(os.getpid(), sig)
    threading.Event().wait()


@pytest.mark.parametrize("sig,match", [(signal.SIGKILL, "was killed"), (signal.SIGSEGV, "SIGSEGV"),
                                       (signal.SIGABRT, "SIGABRT")])
def test_a_dead_child_gives_a_clear_error(tmp_path, sig, match):
    with pytest.raises(ModelLoadError, match=match):
        run_isolated(_kills_itself, tmp_path / "k.bin", sig)


def _raises(path: Path, exc: BaseException) -> None:
    raise exc


def test_exceptions_come_back_with_their_type(tmp_path):
    with pytest.raises(lipsdp.InvalidNetworkError, match="bad shapes"):
        run_isolated(_raises, tmp_path / "e.bin", lipsdp.InvalidNetworkError("bad shapes"))
    with pytest.raises(ValueError, match="a bug") as info:  # not a user error: the type is kept for debugging
        run_isolated(_raises, tmp_path / "e.bin", ValueError("a bug"))
    assert any("_raises" in note for note in getattr(info.value, "__notes__", []))


class _Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def test_an_exception_that_cannot_travel_is_still_an_error(tmp_path):
    with pytest.raises(LipSDPError, match="_Unpicklable: x y"):
        run_isolated(_raises, tmp_path / "u.bin", _Unpicklable("x", "y"))


def _exits(path: Path) -> None:
    os._exit(5)


def test_a_child_that_exits_silently_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="without a result"):
        run_isolated(_exits, tmp_path / "s.bin")


def test_onnx_loads_under_a_small_memory_limit(tmp_path, monkeypatch):
    """The ONNX reader must not reserve its 2 GiB size cap up front (it did, with fh.read(2**31))."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "small.onnx"
    path.write_bytes(model.SerializeToString())
    monkeypatch.setenv("LIPSDP_LOAD_MEMORY_GIB", "0.5")
    assert load_network(path).sizes == [3, 2]


def test_works_from_a_thread(tmp_path):
    """Loaders also run in worker threads (e.g. Dask): the forked child must still report back."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(r=run_isolated(_returns_arrays, tmp_path / "t.bin")))
    thread.start()
    thread.join()
    assert out["r"]["pid"] != os.getpid() and out["r"]["name"] == "t.bin"
