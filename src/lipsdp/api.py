"""The public entry point: `estimate(model, method=...) -> Result`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lipsdp.certificate import certified_product
from lipsdp.errors import LipSDPError
from lipsdp.io import load_network
from lipsdp.methods import MethodOutput, get_method
from lipsdp.network import Network
from lipsdp.parallel import dask_executor, run_all
from lipsdp.proof import Proof, Step, network_record, write_certificate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """The outcome of `estimate`.

    upper     verified upper bound on the l2 Lipschitz constant (proved in floating point)
    lower     largest Jacobian norm found (a true lower bound), or None if not asked
    raw       the method's own, unverified value (e.g. the solver's sqrt(rho)); for information only
    verified  True: `upper` carries a floating-point proof (every Result does; see `certificate`)
    sdp_lower proven lower bound on the optimum of the LipSDP variant the method solves (`neuron`, `layer`),
              from the solver's dual iterate (`lipsdp.dual`); `gap` = upper / sdp_lower - 1 is then the
              proven distance of `upper` to the best bound that LipSDP variant can give
    proof     the data that proves `upper` (`lipsdp.proof.Proof`: rho and multipliers, or per-layer norms, and
              the exact transforms from your network); `save_certificate` writes it for `lipsdp.verify`
    """

    upper: float
    lower: float | None
    method: str
    verified: bool
    raw: float
    seconds: float
    solver: str | None = None
    status: str = "ok"
    certificate: str = ""
    network: str = ""
    pieces: int = 1
    notes: tuple[str, ...] = ()
    sdp_lower: float | None = None
    multipliers: np.ndarray | None = field(default=None, repr=False, compare=False)
    lower_point: np.ndarray | None = field(default=None, repr=False, compare=False)
    proof: Proof | None = field(default=None, repr=False, compare=False)

    @property
    def ratio(self) -> float | None:
        """upper / lower: how far the certified bound can be from the truth (1 = tight)."""
        if self.lower is None or self.lower <= 0:
            return None
        return self.upper / self.lower

    @property
    def gap(self) -> float | None:
        """Proven relative distance of `upper` to the LipSDP optimum (upper / sdp_lower - 1), if known."""
        if self.sdp_lower is None or self.sdp_lower <= 0:
            return None
        return self.upper / self.sdp_lower - 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays)."""
        data = asdict(self)
        data.pop("multipliers")
        data.pop("lower_point")
        data.pop("proof")
        data["notes"] = list(self.notes)
        data["ratio"] = self.ratio
        data["gap"] = self.gap
        return data

    def save_certificate(self, path: str | Path) -> Path:
        """Write this bound's proof to `path` as a JSON certificate (every number an exact hex float) that
        `lipsdp verify CERT MODEL` / `lipsdp.verify` re-proves independently. Returns the path."""
        if self.proof is None or self.proof.network is None:
            raise LipSDPError(
                "this result carries no proof to save (a plug-in method without one, or a custom region type); "
                "use a built-in method and a lipsdp.Box / lipsdp.Ball region"
            )
        try:
            return write_certificate(path, self.proof, self.upper, self.method)
        except OSError as exc:
            raise LipSDPError(f"cannot write the certificate to {path}: {exc}") from None


def _region_record(region: Any) -> dict[str, Any] | None:
    """The region as plain arrays for a proof (None for a region type other than Box / Ball)."""
    from lipsdp.region import Ball, Box

    if isinstance(region, Box):
        return {"kind": "box", "low": np.array(region.low), "high": np.array(region.high)}
    if isinstance(region, Ball):
        return {"kind": "ball", "center": np.array(region.center), "eps": float(region.eps)}
    return None


def _bound_piece(net: Network, method: str, options: dict[str, Any]) -> MethodOutput:
    """Module-level task: bound one network (or one piece of it) with one method, with the BLAS / torch
    threads that `threads.threads_for_sizes` gives its LMI (one for small problems: steady on a busy machine);
    a dense LMI method whose blocks cannot fit in memory is refused first (`lipsdp.memory`)."""
    from lipsdp.memory import check_fits
    from lipsdp.scaling import bound_rescaled
    from lipsdp.threads import limited_threads, threads_for_sizes

    check_fits(net, method)
    options = dict(options)
    threads = threads_for_sizes(net.sizes, options.pop("threads", None))
    if method == "anytime":
        import torch  # noqa: F401 - loaded first so that its threads are limited too
    with limited_threads(threads):
        return bound_rescaled(get_method(method), net, method, options)


POOL_WEIGHT_EVALUATIONS = (500, 150)  # proxy evaluations to choose pool weights (other methods, naive: a
# cheap bound). Convnet_maxpool (0.05 s each): its proxy gains 1.43x with 500, 1.3x with 150


def _bound_composed(
    composition: Any, method: str, options: dict[str, Any], pair: tuple[int, int] | None, steps: list[Step],
    workers: int, executor: Executor | None,
) -> tuple[MethodOutput, int]:
    """Bound each part of a composition (the class pair on the last part) and multiply, with weighted pools
    when `compose.choose_weights` finds them better, else times the pools' constants sqrt(m)
    (`lipsdp.compose`); its proof is a 'compose' proof whose only step is the pair."""
    from lipsdp.compose import choose_weights, pool_lipschitz, weighted_parts
    from lipsdp.network import pair_network

    parts, pools = list(composition.parts), ()
    constants = [pool_lipschitz(m) for m in composition.multiplicities]
    chosen = choose_weights(composition, evaluations=POOL_WEIGHT_EVALUATIONS[method == "naive"])
    if chosen is not None:
        try:
            weighted = weighted_parts(composition, chosen[0])
        except ValueError:  # a scaling would not be exact: the plain composition
            chosen = None
    if chosen is not None:
        # the weights are chosen on a proxy; they are kept only when the naive product agrees (never looser)
        if pair is not None:
            weighted[-1] = pair_network(weighted[-1], pair)
            parts[-1] = pair_network(parts[-1], pair)
        naive_w = [_bound_piece(p, "naive", {}) for p in weighted]
        naive_p = [_bound_piece(p, "naive", {}) for p in parts]
        if certified_product([o.upper for o in naive_w]) <= certified_product([o.upper for o in naive_p] + constants):
            parts, naive_p, constants = weighted, naive_w, [1.0] * len(constants)
            pools = tuple((w.out_exponents, w.in_exponents) for w in chosen[0])
        else:
            chosen = None
        outputs = naive_p if method == "naive" else None
    else:
        if pair is not None:
            parts[-1] = pair_network(parts[-1], pair)
        outputs = None
    if outputs is None:
        outputs = run_all(_bound_piece, [(p, method, options) for p in parts], workers=workers, executor=executor)
    upper = certified_product([o.upper for o in outputs] + constants)
    raw = float(np.prod([o.raw for o in outputs]) * np.prod(constants))
    if chosen is None:
        notes = [
            (f"max pooling: the bound is composed of {len(parts)} parts at {len(constants)} max pools (times "
            f"{', '.join(f'sqrt({m})' for m in composition.multiplicities)}); pools='exact' bounds the exact chain")
        ]
    else:
        notes = [
            (f"max pooling: the bound is composed of {len(parts)} parts at {len(constants)} weighted max pools "
             f"(weights chosen on the parts' linearisations, {chosen[1]:.3g}x below the plain composition there); "
             "pools='exact' bounds the exact chain")
        ]
    for i, o in enumerate(outputs):
        notes.extend(f"part {i + 1}: {n}" for n in o.notes)
    status = "ok" if all(o.status in ("ok", "optimal") for o in outputs) else ",".join(o.status for o in outputs)
    out = MethodOutput(upper, raw, status, outputs[0].certificate, None, notes, outputs[-1].solver)
    if all(o.proof is not None for o in outputs):
        out.proof = Proof(
            "compose", tuple(steps), lipschitz=tuple(constants), pieces=tuple(o.proof for o in outputs), pools=pools
        )
    return out, len(parts)


def estimate(
    model: Any,
    method: str = "neuron",
    *,
    solver: str | None = None,
    split: int | None = None,
    workers: int = 1,
    lower: bool = False,
    seed: int = 0,
    executor: Executor | None = None,
    lower_samples: int = 512,
    lower_steps: int = 100,
    pair: tuple[int, int] | None = None,
    region: Any = None,
    dask: str | None = None,
    pools: str = "compose",
    **options: Any,
) -> Result:
    """Certified upper bound on the l2 Lipschitz constant of `model` (and optionally a lower bound).

    model    a `Network`, a torch module, or a path to a .npz / .mat / .onnx file
    method   a registered method name (see `lipsdp.available_methods()`); 'network' is refused as unsound
    solver   'clarabel' (default), 'scs' or 'mosek' for the SDP methods
    split    cut the chain into pieces of `split` weight matrices, bound each, multiply (looser, parallel)
    workers  processes for independent pieces; `executor` overrides with any concurrent.futures.Executor
    dask     address of an existing Dask scheduler ('tcp://host:8786') to run the pieces on
    pools    'compose' (default): a graph factored by max pools is bounded part by part, times sqrt(m) per
             pool (`lipsdp.compose`; global and class-pair bounds); 'exact': the exact lowering of the pools
             as one chain (tighter LipSDP possible on small nets, far wider chains)
    lower    also search for a lower bound (largest Jacobian norm), seeded by `seed`
    pair     (i, j): bound f_i - f_j instead of the whole output (for certified robustness)
    region   `lipsdp.Box(low, high)` or `lipsdp.Ball(center, eps)`: a bound valid for inputs in the region
             only (slopes tightened by interval bound propagation); `lower` then searches the region
    input_shape  (C, H, W) of one sample, for torch models with convolutions
    nnet_units   for .nnet files: 'normalized' (default, the file's network) or 'raw' (the bound in the
             units of the raw inputs and outputs: the file's normalisation folded into the weights)
    activation   the hidden activation of .npz / .mat files that do not record one ('maxmin', ...)
    """
    start = time.perf_counter()
    get_method(method)  # fail fast on unknown names
    if pools not in ("compose", "exact"):
        raise LipSDPError(f"pools must be 'compose' or 'exact', got {pools!r}")
    if not isinstance(workers, int) or workers < 1:
        raise LipSDPError(f"workers must be a positive integer, got {workers!r}")
    if dask is not None and executor is None:
        executor = dask_executor(dask)
    loader_opts = {k: options.pop(k) for k in ("input_shape", "nnet_units", "activation") if k in options}
    net = load_network(model, **loader_opts)
    user_net = net
    composition = getattr(net, "composition", None)
    composed = (
        pools == "compose" and region is None and split is None
        and composition is not None and composition.applies_to(net)
    )
    method_opts = dict(options, solver=solver, seed=seed)
    notes: list[str] = []
    steps: list[Step] = []  # the exact transforms from the user's network to the one bounded (for the proof)
    provable = True
    if region is not None:
        from lipsdp.region import localize

        local = localize(net, region)
        net, region = local.network, local.region
        notes.append(local.note())
        record = _region_record(region)
        provable = record is not None
        steps.append(Step("localize", keep=tuple(tuple(int(i) for i in k) for k in local.kept), region=record,
                          zeroed=tuple(local.zeroed)))
    if pair is not None:
        from lipsdp.network import pair_network

        net = pair_network(net, pair)
        steps.append(Step("pair", pair=(int(pair[0]), int(pair[1]))))
        notes.append(f"pair ({pair[0]}, {pair[1]}): bound of the logit difference f_{pair[0]} - f_{pair[1]}")
    if composed:
        out, n_pieces = _bound_composed(composition, method, method_opts, pair, steps, workers, executor)
        notes.extend(out.notes)
    elif split is not None and split < len(net.weights):
        pieces = net.split(split)
        outputs = run_all(
            _bound_piece, [(p, method, method_opts) for p in pieces], workers=workers, executor=executor
        )
        boundary = net.boundary_lipschitz(split)
        if any(b != 1.0 for b in boundary):
            notes.append(
                "split: bounds of the pieces multiplied by the Lipschitz constants of the activations between "
                f"them ({', '.join(f'{b:g}' for b in boundary)})"
            )
        upper = certified_product([o.upper for o in outputs] + boundary)
        raw = float(np.prod([o.raw for o in outputs]) * np.prod(boundary))
        for i, o in enumerate(outputs):
            notes.extend(f"piece {i + 1}: {n}" for n in o.notes)
        status = "ok" if all(o.status in ("ok", "optimal") for o in outputs) else ",".join(o.status for o in outputs)
        out = MethodOutput(upper, raw, status, outputs[0].certificate, None, notes, outputs[0].solver)
        if all(o.proof is not None for o in outputs):
            out.proof = Proof(
                "split", tuple(steps), split=int(split), lipschitz=tuple(boundary),
                pieces=tuple(o.proof for o in outputs),
            )
        n_pieces = len(pieces)
    else:
        out = _bound_piece(net, method, method_opts)
        notes.extend(out.notes)
        if out.proof is not None:
            out.proof = out.proof.after(*steps)
        n_pieces = 1
    proof = replace(out.proof, network=network_record(user_net)) if provable and out.proof is not None else None
    lower_value = lower_point = None
    if lower:
        from lipsdp.lower import lower_bound

        lb = lower_bound(net, samples=lower_samples, steps=lower_steps, seed=seed, region=region)
        lower_value, lower_point = lb.value, lb.point
        if lower_value > out.upper * (1 + 1e-9):
            raise LipSDPError(
                f"internal inconsistency: lower bound {lower_value} exceeds verified upper bound {out.upper}; "
                "please report this network"
            )
    return Result(
        upper=float(out.upper),
        lower=lower_value,
        method=method,
        verified=True,
        raw=float(out.raw),
        seconds=time.perf_counter() - start,
        solver=out.solver,
        status=out.status,
        certificate=out.certificate,
        network=net.describe(),
        pieces=n_pieces,
        notes=tuple(notes),
        sdp_lower=out.sdp_lower if n_pieces == 1 else None,
        multipliers=out.multipliers,
        lower_point=lower_point,
        proof=proof,
    )


def _estimate_task(model: Any, method: str, kwargs: dict[str, Any]) -> Result:
    """Module-level task: one whole model (for runs over many models); errors name the model."""
    try:
        return estimate(model, method, **kwargs)
    except LipSDPError as exc:
        label = str(model) if isinstance(model, (str, Path)) else type(model).__name__
        if str(exc).startswith(f"{label}:"):  # loaders already name their file
            raise
        raise type(exc)(f"{label}: {exc}") from None


def _estimate_or_error(model: Any, method: str, kwargs: dict[str, Any]) -> Result | LipSDPError:
    """`_estimate_task`, but a LipSDPError is returned in place of the Result (runs that keep going)."""
    try:
        return _estimate_task(model, method, kwargs)
    except LipSDPError as exc:
        return exc


def estimate_many(
    models: list[Any],
    method: str = "neuron",
    *,
    workers: int = 1,
    executor: Executor | None = None,
    dask: str | None = None,
    on_done: Callable[[int, Result], None] | None = None,
    keep_going: bool = False,
    **kwargs: Any,
) -> list[Result]:
    """`estimate` for several models, in parallel over models (local processes, an executor, or Dask).

    Results come back in the order of `models` whichever executor ran them; `on_done(index, result)` is
    called as each finishes (progress, incremental output). With `keep_going`, a model that fails with a
    LipSDPError (unreadable file, bad weights, ...) gets that error in its place instead of ending the run."""
    get_method(method)
    if dask is not None and executor is None:
        executor = dask_executor(dask)
    items = [(m, method, dict(kwargs, workers=1)) for m in models]
    task = _estimate_or_error if keep_going else _estimate_task
    return run_all(task, items, workers=workers, executor=executor, on_done=on_done)
