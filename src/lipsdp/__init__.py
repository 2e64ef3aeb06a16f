"""lipsdp: certified upper bounds (and lower bounds) on the Lipschitz constant of neural networks."""

from lipsdp.api import Result, estimate
from lipsdp.errors import (
    InvalidNetworkError,
    LipSDPError,
    ModelLoadError,
    SolverError,
    UnknownMethodError,
    UnsupportedLayerError,
    VerificationError,
)
from lipsdp.io import load_network
from lipsdp.methods import available_methods
from lipsdp.network import Network
from lipsdp.region import Ball, Box
from lipsdp.robustness import certify, pair_bounds
from lipsdp.verify import Verification, verify

__all__ = [
    "Ball",
    "Box",
    "InvalidNetworkError",
    "LipSDPError",
    "ModelLoadError",
    "Network",
    "Result",
    "SolverError",
    "UnknownMethodError",
    "UnsupportedLayerError",
    "Verification",
    "VerificationError",
    "available_methods",
    "certify",
    "estimate",
    "load_network",
    "pair_bounds",
    "verify",
]
__version__ = "0.1.0"
