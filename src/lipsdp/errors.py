"""Errors a user can cause. Each message says what is wrong and what to do about it."""


class LipSDPError(Exception):
    """Base class of every error lipsdp raises on purpose."""


class InvalidNetworkError(LipSDPError, ValueError):
    """The network's weights, shapes or activations are not usable."""


class ModelLoadError(LipSDPError):
    """A model file or object could not be turned into a Network."""


class UnsupportedLayerError(ModelLoadError):
    """A model contains a layer or operation lipsdp cannot bound soundly."""


class UnknownMethodError(LipSDPError, ValueError):
    """The method name is not in the registry (or is deliberately not offered)."""


class SolverError(LipSDPError):
    """A solver is missing, failed, or returned nothing that can be verified."""


class VerificationError(LipSDPError):
    """No verified upper bound could be produced."""


class CertificateError(LipSDPError):
    """A certificate file cannot be read or is not a lipsdp certificate."""
