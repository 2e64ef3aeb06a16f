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

__all__ = [
    "InvalidNetworkError",
    "LipSDPError",
    "ModelLoadError",
    "Network",
    "Result",
    "SolverError",
    "UnknownMethodError",
    "UnsupportedLayerError",
    "VerificationError",
    "available_methods",
    "estimate",
    "load_network",
]
__version__ = "0.1.0"
