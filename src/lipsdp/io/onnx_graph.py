"""Reading ONNX files and reducing their graphs to the data path, before the chain walker sees them.

`read_model` reads `.onnx` and gzip-compressed `.onnx.gz` files, with external tensor data (the
`model.onnx.data` files of large torch exports) resolved against the model's folder and refused outside it.

`prepare` makes the graph concrete for one sample and folds everything that does not depend on it:
- the batch dimension is fixed to 1 and the other input sizes to their declared (or given) values;
- ONNX shape inference gives every tensor a static shape, so `Shape`/`Size` of the data become constants;
- every node whose inputs are all constants (Constant, weight normalisation such as W / ||W||, the
  Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains of torch exports) is evaluated with
  `onnx.reference.ReferenceEvaluator` and replaced by its value;
- nodes whose outputs nothing uses are dropped.
A graph that only looked branched because of its shape computations is then a chain. Folding evaluates
ops on constants in their own precision (float32 for float32 weights), as onnxruntime would.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lipsdp.errors import ModelLoadError

MAX_UNCOMPRESSED = 2**31 - 1  # protobuf's own limit for one message
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
_MAX_ROUNDS = 6


def is_onnx_path(path: Path) -> bool:
    """True for file names lipsdp reads as ONNX: *.onnx and *.onnx.gz."""
    return path.name.lower().endswith((".onnx", ".onnx.gz"))


def _check_external_locations(model: Any, base: Path, where: str) -> None:
    """Refuse external-data references that leave the model's folder or point to missing files."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    root = base.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (root / location).resolve()
        if os.path.isabs(location) or (target != root and root not in target.parents):
            raise ModelLoadError(
                f"{where}: tensor '{tensor.name}' keeps its data in '{location}', outside the model's folder; "
                "lipsdp only reads external data files that sit beside the model"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{where}: tensor '{tensor.name}' keeps its data in '{location}', which is not in {root}; "
                "copy the .onnx file together with its external data file(s)"
            )


def _read_at_most(fh: Any, limit: int) -> bytes:
    """Up to `limit` bytes, in chunks: `fh.read(limit)` would reserve `limit` bytes up front (2 GiB here),
    beyond the memory limit of the isolated loader process (lipsdp.io.isolation)."""
    chunks, size = [], 0
    while size < limit:
        chunk = fh.read(min(1 << 24, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_model(path: str | Path) -> Any:
    """Parse an .onnx or .onnx.gz file (external data from the model's folder) and run the ONNX checker.

    Raises ModelLoadError naming the file when it cannot be read, decompressed, parsed or checked.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    where = str(path)
    try:
        if path.name.lower().endswith(".gz"):
            import gzip

            with gzip.open(path, "rb") as fh:
                data = _read_at_most(fh, MAX_UNCOMPRESSED + 1)
            if len(data) > MAX_UNCOMPRESSED:
                raise ModelLoadError(f"{where}: decompresses to more than 2 GiB, beyond what an ONNX file can hold")
        else:
            with open(path, "rb") as fh:
                data = _read_at_most(fh, MAX_UNCOMPRESSED + 1)
            if len(data) > MAX_UNCOMPRESSED:
                raise ModelLoadError(f"{where}: larger than 2 GiB; keep large weights in external data files")
    except ModelLoadError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # gzip: BadGzipFile (OSError), EOFError, zlib
        raise ModelLoadError(f"{where}: cannot read the file ({type(exc).__name__}: {exc})"[:600]) from None
    try:
        model = onnx.load_model_from_string(data)
        _check_external_locations(model, path.parent, where)
        load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf, the external-data helper and the checker raise many types
        raise ModelLoadError(f"{where}: not a readable ONNX model ({type(exc).__name__}: {exc})"[:600]) from None
    return model


def _dims(value: Any) -> list[int | None] | None:
    """Declared dims of a ValueInfo (None for symbolic ones), or None when no shape is declared."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


def input_full_shape(value: Any, given: tuple[int, ...] | None, where: str) -> tuple[int, ...]:
    """The static shape of the data input for one sample: batch dimension (first of rank >= 2) set to 1.

    `given` is the per-sample shape (no batch dimension), needed only when other sizes are symbolic.
    """
    dims = _dims(value)
    if not dims:
        if given is None:
            raise ModelLoadError(f"{where}: the graph input has no declared shape; pass input_shape")
        return (1, *(int(v) for v in given))
    batched = len(dims) >= 2
    sample = dims[1:] if batched else dims
    if given is not None:
        given = tuple(int(v) for v in given)
        if len(given) != len(sample) or any(d is not None and d != g for d, g in zip(sample, given)):
            raise ModelLoadError(
                f"{where}: input_shape {given} does not match the graph's input shape {tuple(sample)} "
                "(per sample, without the batch dimension)"
            )
        sample = list(given)
    if any(d is None or d < 1 for d in sample):
        raise ModelLoadError(
            f"{where}: the graph input has symbolic sizes {tuple(sample)} besides the batch dimension; "
            "pass input_shape=(C, H, W)"
        )
    return ((1,) if batched else ()) + tuple(int(d) for d in sample)


@dataclass
class Prepared:
    """The reduced graph: data input (name, static shape), nodes on the data path, constants, output."""

    graph: Any
    input_name: str
    input_shape: tuple[int, ...]
    consts: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    opset: int
    positions: dict[str, int]

    def position(self, node: Any, fallback: int) -> int:
        """The node's index in the original file's graph (for error messages)."""
        return self.positions.get(node.output[0] if node.output else "", fallback)


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _static_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Shapes that ONNX shape inference can fix (every dimension known); {} if inference fails."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
        return {}
    shapes = {}
    graph = inferred.graph
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = _dims(value)
        if dims is not None and all(d is not None for d in dims):
            shapes[value.name] = tuple(int(d) for d in dims)
    return shapes


def _evaluate(node: Any, inputs: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    """Run one node on constant inputs with the ONNX reference implementation; None if it cannot."""
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(node, opsets={"": opset})
        feeds = {name: inputs[name] for name in node.input if name}
        return [np.asarray(v) for v in evaluator.run(None, feeds)]
    except Exception:  # noqa: BLE001 - an op the reference cannot run stays in the graph (and is named later)
        return None


def _initializer(numpy_helper: Any, tensor: Any, where: str) -> np.ndarray:
    """An initializer as an array; data that does not match its dims or type is a ModelLoadError."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # noqa: BLE001 - e.g. dims that do not fit the data, an unknown data type
        message = f"{where}: initializer '{tensor.name}' is unreadable ({type(exc).__name__}: {exc})"
        raise ModelLoadError(message[:600]) from None


def prepare(model: Any, where: str, input_shape: tuple[int, ...] | None = None) -> Prepared:
    """Fix the input shape, infer shapes, fold constant subgraphs and drop dead nodes (see the module doc)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    opset = _opset(model)
    positions = {node.output[0]: i for i, node in enumerate(graph.node) if node.output}
    consts: dict[str, np.ndarray] = {t.name: _initializer(numpy_helper, t, where) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        from lipsdp.errors import UnsupportedLayerError

        raise UnsupportedLayerError(
            f"{where}: the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); lipsdp reads "
            "single-input chain graphs"
        )
    data_input = inputs[0]
    full_shape = input_full_shape(data_input, input_shape, where)

    work = onnx.ModelProto()
    work.CopyFrom(model)
    del work.graph.value_info[:]
    for value in work.graph.input:
        if value.name == data_input.name:
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for d in full_shape:
                shape.dim.add().dim_value = d
    # Initializers listed as graph inputs (old exporters) are constants, not inputs to override.
    kept_inputs = [v for v in work.graph.input if v.name == data_input.name]
    del work.graph.input[:]
    work.graph.input.extend(kept_inputs)

    nodes = list(work.graph.node)
    shapes: dict[str, tuple[int, ...]] = {}
    for _ in range(_MAX_ROUNDS):
        shapes = _static_shapes(work)
        shapes[data_input.name] = full_shape
        folded_any = False
        remaining = []
        for node in nodes:
            value = _fold(node, consts, shapes, opset)
            if value is None:
                remaining.append(node)
                continue
            for name, array in zip(node.output, value):
                if name:
                    consts[name] = array
            folded_any = True
        nodes = remaining
        if not folded_any:
            break
        # New constants (e.g. a Reshape target) can fix more shapes: infer again on the reduced graph.
        del work.graph.node[:]
        work.graph.node.extend(nodes)
        _set_initializers(work.graph, consts, nodes)

    nodes = _live(nodes, [o.name for o in work.graph.output])
    del work.graph.node[:]
    work.graph.node.extend(nodes)
    _set_initializers(work.graph, consts, nodes)
    return Prepared(work.graph, data_input.name, full_shape, consts, shapes, opset, positions)


def _fold(node: Any, consts: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], opset: int):
    """The node's output values when they do not depend on the data input, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM or node.op_type in _CONTROL_FLOW:
        return None
    names = [n for n in node.input if n]
    if node.op_type in ("Shape", "Size") and names and names[0] not in consts and names[0] in shapes:
        placeholder = np.broadcast_to(np.zeros((), dtype=np.float32), shapes[names[0]])
        return _evaluate(node, {names[0]: placeholder}, opset)
    if not all(n in consts for n in names):
        return None
    if node.op_type == "Identity" and names:
        return [consts[names[0]]]
    return _evaluate(node, consts, opset)


def _live(nodes: list[Any], outputs: list[str]) -> list[Any]:
    """The nodes some graph output depends on, in their original order."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(n for n in node.input if n)
    return keep[::-1]


def _set_initializers(graph: Any, consts: dict[str, np.ndarray], nodes: list[Any]) -> None:
    from onnx import numpy_helper

    used = {n for node in nodes for n in node.input if n} | {o.name for o in graph.output}
    del graph.initializer[:]
    for name in sorted(used & consts.keys()):
        array = consts[name]
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name=name))

