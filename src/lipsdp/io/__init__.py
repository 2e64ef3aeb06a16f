"""Loaders: turn a model object or file into a `Network`.

`load_network(model)` accepts a Network, a torch module or ExportedProgram, or a path (.npz, .mat, .onnx,
.onnx.gz, .nnet, .pt2).
Files parsed by C extensions go through `run_isolated` (a child process with memory and time limits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lipsdp.errors import ModelLoadError
from lipsdp.io.isolation import run_isolated
from lipsdp.network import Network

SUPPORTED_FILES = ".npz, .mat, .onnx, .onnx.gz, .nnet and .pt2"


def load_network(model: Any, **options: Any) -> Network:
    """Dispatch on the model's type (or file suffix) to the right loader."""
    if isinstance(model, Network):
        return model
    activation = options.pop("activation", None)
    if activation is not None and not (
        isinstance(model, (str, Path)) and Path(model).suffix.lower() in (".npz", ".mat")
    ):
        raise ModelLoadError(
            f"activation={activation!r} names the hidden activation of .npz and .mat weight files that do not "
            "record it; other models carry their activations (leave it out)"
        )
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory; give a model file ({SUPPORTED_FILES})")
        suffix = ".onnx.gz" if path.name.lower().endswith(".onnx.gz") else path.suffix.lower()
        if suffix == ".npz":
            from lipsdp.io.arrays import load_npz

            return load_npz(path, activation=activation)
        if suffix == ".mat":
            from lipsdp.io.arrays import load_mat

            # scipy / HDF5 parse in C
            return run_isolated(load_mat, path, preload=("scipy.io",), activation=activation)
        if suffix in (".onnx", ".onnx.gz"):
            from lipsdp.io.onnx_model import load_onnx

            # protobuf parses in C
            return run_isolated(load_onnx, path, preload=("onnx", "onnx.reference"), **options)
        if suffix == ".nnet":
            from lipsdp.io.nnet import load_nnet

            return load_nnet(path, **options)  # plain text, parsed in Python
        if suffix == ".pt2":
            from lipsdp.io.torch_export import load_pt2

            # a zip of JSON and raw tensors; pickled content is refused before torch reads it
            return run_isolated(load_pt2, path, preload=("torch.export",), **options)
        if suffix in (".pt", ".pth", ".ckpt", ".pkl"):
            raise ModelLoadError(
                f"{path}: lipsdp does not read pickled torch files (loading one can run code, and a state_dict "
                "does not record the activations); load it yourself with torch.load(..., weights_only=True), "
                "rebuild the module, and pass it to lipsdp.estimate (or save it with torch.export.save as .pt2)"
            )
        raise ModelLoadError(
            f"{path}: unsupported file type '{suffix or '(none)'}'; lipsdp reads {SUPPORTED_FILES} files "
            "(save a torch model with lipsdp.io.save_npz or export it to ONNX)"
        )
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        from lipsdp.io.torch_model import from_torch

        return from_torch(model, **options)
    if torch is not None and isinstance(model, torch.export.ExportedProgram):
        from lipsdp.io.torch_export import from_exported

        return from_exported(model)
    raise ModelLoadError(
        f"cannot read a model of type {type(model).__name__}; give a lipsdp.Network, a torch.nn.Module, a "
        "torch.export.ExportedProgram, "
        f"or a path to a model file ({SUPPORTED_FILES})"
    )
