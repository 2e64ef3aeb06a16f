"""VNN-LIB properties -> an input box and the output condition to refute.

A VNN-LIB file (the SMT-LIB subset of the VNN-COMP benchmarks) declares the network inputs `X_0 ...`
and outputs `Y_0 ...` and asserts constraints whose conjunction describes a *counter-example*: the
property holds when no input satisfying the input constraints produces outputs satisfying the output
constraints. lipsdp reads the common form used by robustness benchmarks:

- input constraints: one lower and one upper bound per input, `(assert (<= X_i c))`, `(assert (>= X_i c))`
  (or with the constant first), i.e. a box;
- output constraints: a disjunction of conjunctions of comparisons between outputs and constants,
  `(assert (or (and (>= Y_j Y_l)) ...))`, or top-level asserts such as `(assert (<= Y_l Y_j))`.

When every disjunct is the single comparison "Y_j >= Y_l" for one fixed l, the property is the robustness
of the classification `l`: `label` is l and `targets` the classes j that must stay below it. Other
output conditions (thresholds, several comparisons per disjunct) are kept as linear constraints in
`unsafe`, and `label` is None.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipsdp.errors import ModelLoadError

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VARIABLE = re.compile(r"^([XY])_(\d+)$")
MAX_BYTES = 512 * 2**20  # far above any VNN-COMP property (the largest are a few MB)


@dataclass(frozen=True)
class LinearConstraint:
    """sum_j coeffs[j] * Y_j <= bound (one comparison of the output condition)."""

    coeffs: np.ndarray
    bound: float


@dataclass(frozen=True)
class VnnlibProperty:
    """One VNN-LIB property: the input box and the output set that would be a counter-example.

    low, high  the input box (one entry per declared X_i)
    unsafe     the counter-example condition on the outputs: a list of disjuncts, each a list of linear
               constraints that hold together (any disjunct satisfied = the property is violated)
    label      for a robustness property: the class whose output must stay the largest, else None
    targets    the classes j whose "Y_j >= Y_label" is a disjunct (all other classes, usually)
    """

    path: str
    low: np.ndarray
    high: np.ndarray
    n_outputs: int
    unsafe: list[list[LinearConstraint]] = field(repr=False)
    label: int | None = None
    targets: tuple[int, ...] = ()

    @property
    def center(self) -> np.ndarray:
        """The midpoint of the box (the image, except where the box was clipped to the valid range)."""
        return 0.5 * (self.low + self.high)

    @property
    def eps(self) -> float:
        """The largest half-width of the box: it lies in the l_inf ball of this radius around `center`."""
        return float(np.max(0.5 * (self.high - self.low)))

    @property
    def l2_radius(self) -> float:
        """The l2 radius of the box around its centre, ||(high - low) / 2||_2, rounded up."""
        half = 0.5 * (self.high - self.low)
        return float(np.nextafter(np.sqrt(np.sum(half * half)) * (1.0 + 4 * np.finfo(np.float64).eps), np.inf))

    @property
    def region(self):
        """The input box as a `lipsdp.Box`, for local bounds: `lipsdp.estimate(model, region=prop.region)`."""
        from lipsdp.region import Box

        return Box(self.low, self.high)

    def violated_by(self, outputs: np.ndarray) -> np.ndarray | bool:
        """For outputs of shape (n_outputs,) or (batch, n_outputs): does any disjunct hold (a counter-example)?"""
        y = np.atleast_2d(np.asarray(outputs, dtype=np.float64))
        hit = np.zeros(y.shape[0], dtype=bool)
        for conjunct in self.unsafe:
            ok = np.ones(y.shape[0], dtype=bool)
            for c in conjunct:
                ok &= y @ c.coeffs <= c.bound
            hit |= ok
        return hit if np.ndim(outputs) > 1 else bool(hit[0])


def _parse(text: str, where: str) -> list:
    """The top-level S-expressions of `text` (comments after ';' removed) as nested lists of atoms."""
    text = re.sub(r";[^\n]*", "", text)
    stack: list[list] = [[]]
    for token in _TOKEN.findall(text):
        if token == "(":
            stack.append([])
        elif token == ")":
            if len(stack) == 1:
                raise ModelLoadError(f"{where}: unbalanced ')' in the VNN-LIB file")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(token)
    if len(stack) != 1:
        raise ModelLoadError(f"{where}: {len(stack) - 1} unclosed '(' at the end of the VNN-LIB file")
    return stack[0]


def _number(token, where: str) -> float | None:
    if not isinstance(token, str):
        return None
    try:
        value = float(token)
    except ValueError:
        return None
    if not np.isfinite(value):
        raise ModelLoadError(f"{where}: the constant {token} is not finite")
    return value


def _show(expr) -> str:
    if isinstance(expr, str):
        return expr
    return "(" + " ".join(_show(e) for e in expr) + ")"


class _Reader:
    def __init__(self, where: str) -> None:
        self.where = where
        self.declared: dict[str, set[int]] = {"X": set(), "Y": set()}
        self.bounds: dict[int, list[float]] = {}  # input index -> [low, high]
        self.output_terms: list[list[list[tuple[str, list]]]] = []  # conjunction (asserts) of disjunctions

    def variable(self, token) -> tuple[str, int] | None:
        if not isinstance(token, str):
            return None
        match = _VARIABLE.match(token)
        if not match:
            return None
        kind, index = match.group(1), int(match.group(2))
        if index not in self.declared[kind]:
            raise ModelLoadError(f"{self.where}: {token} is used but not declared (declare-const {token} Real)")
        return kind, index

    def statement(self, expr) -> None:
        if not isinstance(expr, list) or not expr:
            raise ModelLoadError(f"{self.where}: unexpected '{_show(expr)[:80]}' at the top level")
        head = expr[0]
        if head == "declare-const":
            if len(expr) != 3 or not isinstance(expr[1], str) or expr[2] != "Real":
                raise ModelLoadError(f"{self.where}: cannot read '{_show(expr)[:80]}' (expected (declare-const X_i Real))")
            match = _VARIABLE.match(expr[1])
            if not match:
                raise ModelLoadError(
                    f"{self.where}: variable '{expr[1]}' is not named X_i (an input) or Y_i (an output)"
                )
            self.declared[match.group(1)].add(int(match.group(2)))
        elif head == "assert":
            if len(expr) != 2:
                raise ModelLoadError(f"{self.where}: '{_show(expr)[:80]}' must assert exactly one formula")
            self.formula(expr[1])
        else:
            raise ModelLoadError(
                f"{self.where}: '{head}' is not supported; lipsdp reads declare-const and assert statements"
            )

    def formula(self, expr) -> None:
        """A top-level asserted formula: an input bound, or a condition on the outputs."""
        if isinstance(expr, list) and expr and expr[0] in ("<=", ">=") and len(expr) == 3:
            kinds = {v[0] for v in (self.variable(expr[1]), self.variable(expr[2])) if v is not None}
            if kinds == {"X"}:
                self.input_bound(expr)
                return
        self.output_terms.append(self.disjunction(expr))

    def input_bound(self, expr) -> None:
        op, a, b = expr
        first, second = self.variable(a), self.variable(b)
        if first is not None and second is not None:
            raise ModelLoadError(
                f"{self.where}: '{_show(expr)}' compares two inputs; lipsdp reads box constraints "
                "(each input against a constant)"
            )
        var, const, upper = (first, _number(b, self.where), op == "<=") if first else (
            second, _number(a, self.where), op == ">=")
        if const is None:
            raise ModelLoadError(f"{self.where}: '{_show(expr)}' must compare an input with a number")
        low, high = self.bounds.setdefault(var[1], [-np.inf, np.inf])
        self.bounds[var[1]] = [low, min(high, const)] if upper else [max(low, const), high]

    def disjunction(self, expr) -> list[list[tuple[str, list]]]:
        """(or A B ...) with each A an (and ...) or a single comparison -> list of conjunctions."""
        if isinstance(expr, list) and expr and expr[0] == "or":
            return [self.conjunction(part) for part in expr[1:]]
        return [self.conjunction(expr)]

    def conjunction(self, expr) -> list[tuple[str, list]]:
        if isinstance(expr, list) and expr and expr[0] == "and":
            out = []
            for part in expr[1:]:
                out.extend(self.conjunction(part))
            return out
        if not (isinstance(expr, list) and len(expr) == 3 and expr[0] in ("<=", ">=", "<", ">")):
            raise ModelLoadError(
                f"{self.where}: cannot read the output condition '{_show(expr)[:120]}'; lipsdp reads "
                "disjunctions (or) of conjunctions (and) of comparisons <=, >= between outputs Y_i and numbers"
            )
        for term in expr[1:]:
            var = self.variable(term)
            if var is not None and var[0] == "X":
                raise ModelLoadError(
                    f"{self.where}: '{_show(expr)[:120]}' mixes inputs into an output condition (or puts input "
                    "bounds inside or/and); lipsdp reads an input box and conditions on the outputs"
                )
            if var is None and _number(term, self.where) is None:
                raise ModelLoadError(
                    f"{self.where}: '{_show(term)[:80]}' in '{_show(expr)[:120]}' is neither an output Y_i nor a number"
                )
        return [(expr[0], expr[1:])]

    def linear(self, op: str, left, right, n_out: int) -> LinearConstraint:
        """left op right -> coeffs . y <= bound (strict and non-strict alike: a counter-example set's
        closure; for certification the difference does not matter)."""
        coeffs = np.zeros(n_out)
        bound = 0.0
        sign = 1.0 if op in ("<=", "<") else -1.0  # a <= b  <=>  a - b <= 0;  a >= b  <=>  b - a <= 0
        for term, factor in ((left, sign), (right, -sign)):
            var = self.variable(term)
            if var is None:
                bound -= factor * _number(term, self.where)
            else:
                coeffs[var[1]] += factor
        return LinearConstraint(coeffs, bound)


def read_vnnlib(path: str | Path) -> VnnlibProperty:
    """Read one VNN-LIB property file (plain text, or gzip-compressed with a .gz suffix).

    Returns the input box, the counter-example condition on the outputs, and, for robustness properties,
    the label. Raises ModelLoadError naming the file for anything outside the supported subset (see the
    module docstring), for inputs without both bounds, and for empty boxes.
    """
    path = Path(path)
    where = str(path)
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            chunks, size = [], 0  # in chunks: read(MAX_BYTES) would reserve the whole limit up front
            while size <= MAX_BYTES:
                chunk = fh.read(1 << 22)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            raw = b"".join(chunks)
    except (OSError, EOFError, zlib.error) as exc:
        raise ModelLoadError(f"{where}: cannot read the property file ({exc})") from None
    if len(raw) > MAX_BYTES:
        raise ModelLoadError(f"{where}: larger than {MAX_BYTES // 2**20} MiB; not a VNN-LIB property lipsdp reads")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelLoadError(f"{where}: not a text (UTF-8) VNN-LIB file") from None
    reader = _Reader(where)
    try:
        for expr in _parse(text, where):
            reader.statement(expr)
    except RecursionError:
        raise ModelLoadError(f"{where}: formulas nested too deeply to read") from None
    n_in = len(reader.declared["X"])
    n_out = len(reader.declared["Y"])
    if n_in == 0 or reader.declared["X"] != set(range(n_in)):
        raise ModelLoadError(f"{where}: the inputs must be declared as X_0 ... X_(n-1); found {n_in} inputs")
    if n_out == 0 or reader.declared["Y"] != set(range(n_out)):
        raise ModelLoadError(f"{where}: the outputs must be declared as Y_0 ... Y_(m-1); found {n_out} outputs")
    low, high = np.full(n_in, -np.inf), np.full(n_in, np.inf)
    for i, (lo, hi) in reader.bounds.items():
        low[i], high[i] = lo, hi
    unbounded = np.flatnonzero(~np.isfinite(low) | ~np.isfinite(high))
    if unbounded.size:
        raise ModelLoadError(
            f"{where}: input X_{unbounded[0]} (and {unbounded.size - 1} more) lacks a lower or an upper bound; "
            "lipsdp needs a bounded input box"
        )
    if np.any(low > high):
        bad = int(np.flatnonzero(low > high)[0])
        raise ModelLoadError(f"{where}: the box is empty: X_{bad} >= {low[bad]} and <= {high[bad]}")
    if not reader.output_terms:
        raise ModelLoadError(f"{where}: no output condition (assert on Y_i); nothing to verify")
    # The asserts hold together: a conjunction of disjunctions; distribute into one disjunction (DNF).
    dnf: list[list[tuple[str, list]]] = [[]]
    for disjunction in reader.output_terms:
        dnf = [left + right for left in dnf for right in disjunction]
        if len(dnf) > 10_000:
            raise ModelLoadError(f"{where}: the output condition expands to more than 10000 cases")
    unsafe = [[reader.linear(op, a, b, n_out) for op, (a, b) in conjunct] for conjunct in dnf]
    label, targets = _robustness_label(unsafe)
    return VnnlibProperty(where, low, high, n_out, unsafe, label, targets)


def _robustness_label(unsafe: list[list[LinearConstraint]]) -> tuple[int | None, tuple[int, ...]]:
    """(l, (j, ...)) when every disjunct is the single constraint Y_l - Y_j <= 0, else (None, ())."""
    label, targets = None, []
    for conjunct in unsafe:
        if len(conjunct) != 1 or conjunct[0].bound != 0.0:
            return None, ()
        c = conjunct[0].coeffs
        plus, minus = np.flatnonzero(c == 1.0), np.flatnonzero(c == -1.0)
        if plus.size != 1 or minus.size != 1 or np.count_nonzero(c) != 2:
            return None, ()
        if label is None:
            label = int(plus[0])
        if int(plus[0]) != label:
            return None, ()
        targets.append(int(minus[0]))
    return label, tuple(sorted(set(targets)))
