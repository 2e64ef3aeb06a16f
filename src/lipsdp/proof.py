"""What proves a verified bound: a small record every method hands back, and its JSON file form.

A `Proof` says *why* L <= upper, in data an independent checker (`lipsdp.verify`) can re-prove:

- kind 'lmi':     F(rho, T) >= 0 for the network the method saw, with per-neuron slope bounds
                  `alphas`/`betas` and multipliers T >= 0 (`multipliers`); then L <= sqrt(rho)
                  (LipSDP; the block formulas of F are in `lipsdp.lmi` and, written independently, in
                  `lipsdp.verify`).
- kind 'product': rho_k I - W_k'W_k >= 0 for every layer (`rhos`, so ||W_k||_2 <= sqrt(rho_k)) and
                  `lipschitz[k]` >= every slope bound of hidden layer k; then L <= prod sqrt(rho_k) lip_k.
- kind 'zero':    the network is constant (a zero layer, or a layer all of whose neurons are dead): L = 0.
- kind 'split':   the chain cut into pieces of `split` weight matrices, each with its own proof
                  (`pieces`), and `lipschitz` the constants of the activations at the cuts:
                  L <= prod(piece bounds) * prod(lipschitz).
- kind 'compose': the network's graph factored at max pools (`lipsdp.compose`): `pieces` the proofs of its
                  parts in order, `lipschitz[i]` with lipschitz[i]^2 >= the multiplicity of pool i; then
                  L <= prod(part bounds) * prod(lipschitz). With `pools` (per pool: the exponents e_i of
                  its outputs' weights 4^e_i and f_j of its inputs' 4^f_j, None for weight 0), the pieces
                  prove the weighted parts and lipschitz[i] >= 1 (`lipsdp.compose`, weighted pools). Its
                  only step may be a 'pair', which applies to the last part.

`steps` are the exact transforms, applied in order, from the network the proof is about to the one the
method saw; each maps bounds back as stated in `Step`. The top-level proof also names the user's network
(`network`: its sha256, sizes and activations). Nothing here is trusted by the checker: it rebuilds every
transformed network itself and rejects a proof whose steps do not apply exactly.

This module imports only numpy and the standard library (it sits below every other module).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "lipsdp-certificate"
VERSION = 1
KINDS = ("lmi", "product", "zero", "split", "compose")
STEP_OPS = ("localize", "pair", "keep", "fold", "scale")

HASH_DESCRIPTION = (
    "sha256 of: b'lipsdp-network-v1\\0'; then for each layer k = 0..l: int64 little-endian n_out, n_in, the "
    "weight W_k as float64 little-endian in row-major order, the bias b_k as float64 little-endian; then for "
    "each hidden layer: the activation name in UTF-8, a zero byte, one byte 1/0 (parameter present or not), "
    "the parameter as float64 little-endian (8 zero bytes if absent), the per-neuron slope bounds alpha_k and "
    "beta_k as float64 little-endian; for a layer with pass-through neurons (activation name 'base|identity', "
    "and every 'reflect' layer, even with none) then b'passthrough\\0' and their indices as int64 "
    "little-endian; for a 'reflect' layer then b'flip\\0' and the indices of its |.| neurons likewise"
)


@dataclass(frozen=True)
class Step:
    """One exact transform of a network; `lipsdp.verify` replays it in ball arithmetic.

    op 'localize': restrict to the input `region` ({'kind': 'box', 'low', 'high'} or {'kind': 'ball',
                   'center', 'eps'}); slope bounds then come from interval propagation over the region,
                   neurons constant there are dropped (`keep`: per hidden layer, indices kept) and in
                   the layers listed in `zeroed` the one neuron kept has its outgoing column zeroed (every
                   neuron of that layer is constant). The bound then holds on the region only.
    op 'pair':     replace the output by f_i - f_j (`pair`); the bound is then one of f_i - f_j.
    op 'keep':     drop dead hidden neurons (zero incoming row or zero outgoing column); `keep` lists, per
                   hidden layer, the indices kept. The function is unchanged.
    op 'fold':     multiply out the hidden layers listed in `layers` (0-based), whose every neuron is
                   exactly linear (slope interval a single point a): W_{k+1} diag(a) W_k. Function unchanged.
    op 'scale':    W^_k = 2^e_k W_k (`exponents`); a bound of the scaled network divided by 2^sum(e) is a
                   bound of the original.
    """

    op: str
    keep: tuple[tuple[int, ...], ...] = ()
    layers: tuple[int, ...] = ()
    exponents: tuple[int, ...] = ()
    pair: tuple[int, int] | None = None
    region: dict[str, Any] | None = field(default=None, compare=False)
    zeroed: tuple[int, ...] = ()


@dataclass(frozen=True)
class NetworkRecord:
    """The user's network a top-level proof is about: its hash (`HASH_DESCRIPTION`), sizes, activations
    (name, parameter) and the slope bounds [alpha, beta] of each hidden layer's activation."""

    sha256: str
    sizes: tuple[int, ...]
    activations: tuple[tuple[str, float | None, float, float], ...]


@dataclass(frozen=True)
class Proof:
    """The data that proves a verified bound (see the module docstring for each kind)."""

    kind: str
    steps: tuple[Step, ...] = ()
    rho: float = 0.0
    multipliers: np.ndarray | None = field(default=None, compare=False)
    alphas: tuple[np.ndarray, ...] = field(default=(), compare=False)
    betas: tuple[np.ndarray, ...] = field(default=(), compare=False)
    rhos: tuple[float, ...] = ()
    lipschitz: tuple[float, ...] = ()
    split: int = 0
    pieces: tuple[Proof, ...] = ()
    network: NetworkRecord | None = None
    # 'compose' with weighted pools: per pool (output exponents e_i, input exponents f_j or None)
    pools: tuple[tuple[tuple[int, ...], tuple[int | None, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"proof kind must be one of {KINDS}, got {self.kind!r}")

    def after(self, *steps: Step) -> Proof:
        """The same proof for a network that first goes through `steps` (prepended, in order)."""
        return replace(self, steps=tuple(steps) + self.steps)

    @property
    def local(self) -> bool:
        """True when the bound holds on an input region only (a 'localize' step)."""
        return any(s.op == "localize" for s in self.steps)

    @property
    def pair(self) -> tuple[int, int] | None:
        for s in self.steps:
            if s.op == "pair":
                return s.pair
        return None


def lmi_proof(rho: float, multipliers: np.ndarray, alphas: Sequence[np.ndarray], betas: Sequence[np.ndarray]) -> Proof:
    """An 'lmi' proof: F(rho, T) >= 0 with the given multipliers and per-neuron slope bounds."""
    return Proof(
        "lmi",
        rho=float(rho),
        multipliers=np.array(multipliers, dtype=np.float64).reshape(-1),
        alphas=tuple(np.array(a, dtype=np.float64) for a in alphas),
        betas=tuple(np.array(b, dtype=np.float64) for b in betas),
    )


def keep_step(kept: Sequence[np.ndarray]) -> Step:
    return Step("keep", keep=tuple(tuple(int(i) for i in np.asarray(k).reshape(-1)) for k in kept))


def network_sha256(net: Any) -> str:
    """The sha256 of a network's weights, biases, activations and slope bounds (`HASH_DESCRIPTION`).

    `net` is anything with `weights`, `biases`, `activations` (objects with `name` and `param`), `alphas`
    and `betas` (a `lipsdp.Network`)."""
    h = hashlib.sha256(b"lipsdp-network-v1\0")
    for w, b in zip(net.weights, net.biases):
        h.update(struct.pack("<qq", *w.shape))
        if hasattr(w, "tocsr"):  # a CSR weight (`lipsdp.weights`): the bytes of its dense rows, a block at a time
            step = max(1, (1 << 22) // max(w.shape[1], 1))
            for i in range(0, w.shape[0], step):
                h.update(np.ascontiguousarray(w[i : i + step].toarray(), dtype="<f8").tobytes(order="C"))
        else:
            h.update(np.ascontiguousarray(np.asarray(w, dtype="<f8")).tobytes(order="C"))
        h.update(np.ascontiguousarray(np.asarray(b, dtype="<f8")).tobytes())
    for act, a, b in zip(net.activations, net.alphas, net.betas):
        h.update(act.name.encode("utf-8") + b"\0")
        param = getattr(act, "param", None)
        h.update(b"\1" + struct.pack("<d", float(param)) if param is not None else b"\0" + bytes(8))
        h.update(np.ascontiguousarray(np.asarray(a, dtype="<f8")).tobytes())
        h.update(np.ascontiguousarray(np.asarray(b, dtype="<f8")).tobytes())
        identity = getattr(act, "identity", None)  # a Mixed layer's pass-through neurons
        if identity is not None:
            h.update(b"passthrough\0" + np.asarray(identity, dtype="<i8").tobytes())
        flip = getattr(act, "flip", None)  # a Reflect layer's |.| neurons
        if flip is not None:
            h.update(b"flip\0" + np.asarray(flip, dtype="<i8").tobytes())
    return h.hexdigest()


def network_record(net: Any) -> NetworkRecord:
    """The `NetworkRecord` of a `lipsdp.Network`."""
    acts = tuple(
        (a.name, None if a.param is None else float(a.param), float(a.alpha), float(a.beta)) for a in net.activations
    )
    sizes = tuple([int(net.weights[0].shape[1])] + [int(w.shape[0]) for w in net.weights])
    return NetworkRecord(network_sha256(net), sizes, acts)


# -- JSON ---------------------------------------------------------------------------------------------
def hexf(x: float) -> str:
    """A float as its exact hexadecimal form (`float.hex`): nothing is rounded."""
    return float(x).hex()


def unhex(text: Any) -> float:
    """Inverse of `hexf` (also accepts a JSON number, taken as is)."""
    if isinstance(text, bool):
        raise TypeError(f"expected a hexadecimal float, got {text!r}")
    if isinstance(text, (int, float)):
        return float(text)
    if not isinstance(text, str):
        raise TypeError(f"expected a hexadecimal float, got {text!r}")
    return float.fromhex(text)


def _hex_list(a: Any) -> list[str]:
    return [hexf(x) for x in np.asarray(a, dtype=np.float64).reshape(-1)]


def _floats(items: Any, what: str) -> np.ndarray:
    if not isinstance(items, list):
        raise TypeError(f"{what} must be a list of hexadecimal floats")
    return np.array([unhex(x) for x in items], dtype=np.float64)


def _ints(items: Any, what: str) -> tuple[int, ...]:
    if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"{what} must be a list of integers")
    return tuple(items)


def _region_to_json(region: dict[str, Any]) -> dict[str, Any]:
    if region["kind"] == "box":
        return {"kind": "box", "low": _hex_list(region["low"]), "high": _hex_list(region["high"])}
    return {"kind": "ball", "center": _hex_list(region["center"]), "eps": hexf(region["eps"])}


def _region_from_json(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("kind") not in ("box", "ball"):
        raise ValueError("region must be {'kind': 'box', ...} or {'kind': 'ball', ...}")
    if data["kind"] == "box":
        return {"kind": "box", "low": _floats(data.get("low"), "region low"), "high": _floats(data.get("high"), "region high")}
    return {"kind": "ball", "center": _floats(data.get("center"), "region center"), "eps": unhex(data.get("eps"))}


def step_to_json(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {"op": step.op}
    if step.op in ("keep", "localize"):
        out["keep"] = [list(k) for k in step.keep]
    if step.op == "localize":
        out["region"] = _region_to_json(step.region)
        out["zeroed"] = list(step.zeroed)
    if step.op == "fold":
        out["layers"] = list(step.layers)
    if step.op == "scale":
        out["exponents"] = list(step.exponents)
    if step.op == "pair":
        out["pair"] = list(step.pair)
    return out


def step_from_json(data: Any) -> Step:
    if not isinstance(data, dict) or data.get("op") not in STEP_OPS:
        raise ValueError(f"a step must be an object with 'op' one of {STEP_OPS}")
    op = data["op"]
    if op == "keep":
        return Step(op, keep=tuple(_ints(k, "keep") for k in _list(data.get("keep"), "keep")))
    if op == "localize":
        return Step(
            op,
            keep=tuple(_ints(k, "keep") for k in _list(data.get("keep"), "keep")),
            region=_region_from_json(data.get("region")),
            zeroed=_ints(data.get("zeroed", []), "zeroed"),
        )
    if op == "fold":
        return Step(op, layers=_ints(data.get("layers"), "fold layers"))
    if op == "scale":
        return Step(op, exponents=_ints(data.get("exponents"), "scale exponents"))
    pair = _ints(data.get("pair"), "pair")
    if len(pair) != 2:
        raise ValueError("pair must be two class indices")
    return Step(op, pair=(pair[0], pair[1]))


def _list(items: Any, what: str) -> list[Any]:
    if not isinstance(items, list):
        raise TypeError(f"{what} must be a list")
    return items


def proof_to_json(proof: Proof) -> dict[str, Any]:
    """JSON-ready dict; every float as an exact hexadecimal string."""
    out: dict[str, Any] = {"kind": proof.kind, "steps": [step_to_json(s) for s in proof.steps]}
    if proof.kind == "lmi":
        out["rho"] = hexf(proof.rho)
        out["multipliers"] = _hex_list(proof.multipliers if proof.multipliers is not None else [])
        out["alphas"] = [_hex_list(a) for a in proof.alphas]
        out["betas"] = [_hex_list(b) for b in proof.betas]
    elif proof.kind == "product":
        out["rhos"] = [hexf(r) for r in proof.rhos]
        out["lipschitz"] = [hexf(x) for x in proof.lipschitz]
    elif proof.kind in ("split", "compose"):
        if proof.kind == "split":
            out["split"] = proof.split
        out["lipschitz"] = [hexf(x) for x in proof.lipschitz]
        out["pieces"] = [proof_to_json(p) for p in proof.pieces]
        if proof.pools:
            out["pools"] = [{"out_exponents": list(e), "in_exponents": list(f)} for e, f in proof.pools]
    return out


def _pools_from_json(items: Any) -> tuple[tuple[tuple[int, ...], tuple[int | None, ...]], ...]:
    out = []
    for item in _list(items, "pools"):
        if not isinstance(item, dict):
            raise TypeError("each pool's weights must be an object with 'out_exponents' and 'in_exponents'")
        f = _list(item.get("in_exponents"), "in_exponents")
        if not all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in f):
            raise ValueError("in_exponents must be a list of integers or nulls")
        out.append((_ints(item.get("out_exponents"), "out_exponents"), tuple(f)))
    return tuple(out)


def proof_from_json(data: Any) -> Proof:
    """Inverse of `proof_to_json`; raises ValueError or TypeError naming the malformed field."""
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise ValueError(f"a proof must be an object with 'kind' one of {KINDS}")
    kind = data["kind"]
    steps = tuple(step_from_json(s) for s in _list(data.get("steps", []), "steps"))
    if kind == "lmi":
        return Proof(
            kind,
            steps,
            rho=unhex(data.get("rho")),
            multipliers=_floats(data.get("multipliers"), "multipliers"),
            alphas=tuple(_floats(a, "alphas") for a in _list(data.get("alphas"), "alphas")),
            betas=tuple(_floats(b, "betas") for b in _list(data.get("betas"), "betas")),
        )
    if kind == "product":
        return Proof(
            kind,
            steps,
            rhos=tuple(float(x) for x in _floats(data.get("rhos"), "rhos")),
            lipschitz=tuple(float(x) for x in _floats(data.get("lipschitz"), "lipschitz")),
        )
    if kind in ("split", "compose"):
        split = data.get("split") if kind == "split" else 0
        if kind == "split" and (not isinstance(split, int) or isinstance(split, bool) or split < 1):
            raise ValueError("split must be a positive integer")
        return Proof(
            kind,
            steps,
            split=split,
            lipschitz=tuple(float(x) for x in _floats(data.get("lipschitz"), "lipschitz")),
            pieces=tuple(proof_from_json(p) for p in _list(data.get("pieces"), "pieces")),
            pools=_pools_from_json(data["pools"]) if kind == "compose" and "pools" in data else (),
        )
    return Proof(kind, steps)


def certificate_json(proof: Proof, upper: float, method: str) -> dict[str, Any]:
    """The certificate file's content: the claim (upper, what it bounds), the network and the proof."""
    if proof.network is None:
        raise ValueError("only a top-level proof (one naming its network) can be written as a certificate")
    rec = proof.network
    pair = proof.pair
    target = "f" if pair is None else f"f_{pair[0]} - f_{pair[1]}"
    where = "on the input region of the 'localize' step" if proof.local else "everywhere"
    return {
        "format": FORMAT,
        "version": VERSION,
        "claim": {
            "upper": hexf(upper),
            "upper_decimal": repr(float(upper)),
            "statement": f"the l2 Lipschitz constant of {target} is at most upper, {where}",
            "method": method,
            "local": proof.local,
            "pair": None if pair is None else list(pair),
        },
        "network": {
            "sha256": rec.sha256,
            "hashed": HASH_DESCRIPTION,
            "sizes": list(rec.sizes),
            "activations": [
                {"name": n, "param": None if p is None else hexf(p), "alpha": hexf(a), "beta": hexf(b)}
                for n, p, a, b in rec.activations
            ],
        },
        "proof": proof_to_json(proof),
    }


def write_certificate(path: str | Path, proof: Proof, upper: float, method: str) -> Path:
    """Write the certificate JSON to `path` (a file name); returns the path."""
    path = Path(path)
    text = json.dumps(certificate_json(proof, upper, method), indent=1)
    path.write_text(text + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class CertificateFile:
    """A parsed certificate file: the claimed bound, the network's hash and the proof."""

    upper: float
    method: str
    sha256: str
    sizes: tuple[int, ...]
    proof: Proof
    local: bool = False  # what the claim section says (the proof decides; a mismatch is rejected)
    pair: tuple[int, int] | None = None


def parse_certificate(data: Any) -> CertificateFile:
    """Check the file's structure and parse it; raises ValueError or TypeError naming what is malformed."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a lipsdp certificate (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise ValueError(f"certificate version {data.get('version')!r}; this lipsdp reads version {VERSION}")
    claim, net = data.get("claim"), data.get("network")
    if not isinstance(claim, dict) or not isinstance(net, dict):
        raise TypeError("certificate lacks its 'claim' or 'network' section")
    upper = unhex(claim.get("upper"))
    if math.isnan(upper):
        raise ValueError("claimed upper bound is not a number")
    sha = net.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError("network sha256 missing or malformed")
    pair = claim.get("pair")
    if pair is not None:
        pair = _ints(pair, "claim pair")
        if len(pair) != 2:
            raise ValueError("claim pair must be two class indices")
    return CertificateFile(
        upper,
        str(claim.get("method", "")),
        sha,
        _ints(net.get("sizes", []), "sizes"),
        proof_from_json(data.get("proof")),
        bool(claim.get("local", False)),
        None if pair is None else (pair[0], pair[1]),
    )
