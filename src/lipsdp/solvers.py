"""Choosing a conic solver by name for the CVXPY formulations; a missing one is a clear error."""

from __future__ import annotations

SOLVERS = {
    "clarabel": ("CLARABEL", "clarabel", "pip install clarabel"),
    "scs": ("SCS", "scs", "pip install scs"),
    "mosek": ("MOSEK", "mosek", "pip install 'lipsdp[mosek]' (MOSEK also needs a licence file)"),
}
DEFAULT_SOLVER = "clarabel"


def cvxpy_solver(name: str | None) -> tuple[str, str]:
    """Return (lipsdp name, CVXPY solver constant) for a solver name, or raise SolverError."""
    from lipsdp.errors import SolverError

    key = (name or DEFAULT_SOLVER).strip().lower()
    if key not in SOLVERS:
        raise SolverError(f"unknown solver '{name}'; choose one of: ipm, {', '.join(SOLVERS)}")
    constant, _module, install = SOLVERS[key]
    import cvxpy as cp

    if constant not in cp.installed_solvers():
        raise SolverError(f"solver '{key}' is not installed: {install}")
    if key == "mosek":
        try:
            import mosek

            env = mosek.Env()
            env.checkoutlicense(mosek.feature.pton)
        except Exception as exc:  # noqa: BLE001 - any licence failure means the same to the user
            raise SolverError(f"solver 'mosek' is installed but has no usable licence ({exc}); use 'clarabel'") from None
    return key, constant
