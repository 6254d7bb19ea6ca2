"""gradweight: thin client and protocol types of the gradient-weighting service.

`Client`/`AsyncClient` talk to the server, `RemoteWeighting` is the seed's drop-in, the method specs and
the exception hierarchy are shared with the server. torch is optional and imported only when used.
"""

from .client import AsyncClient, Client, MethodLike, __version__
from .errors import (
    RETRYABLE,
    APIError,
    Degenerate,
    DeviceOutOfMemory,
    GradweightError,
    InternalError,
    InvalidGradients,
    InvalidMethod,
    MalformedBody,
    NonFinite,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    TransportError,
    Unauthorized,
    UnsupportedMediaType,
)
from .methods import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    DualProj,
    FairGrad,
    GradVac,
    Krum,
    Mean,
    MethodSpec,
    Munba,
    Nash,
    NashMTL,
    NoWeighting,
    PCGrad,
    Simple,
    Sum,
    UPGrad,
    parse_method,
)
from .remote import RemoteWeighting, apply_grads
from .retry import Retry
from .types import CombineResult, Health, MethodInfo, WeightsResult

__all__ = [
    "IMTLG",
    "MGDA",
    "RETRYABLE",
    "APIError",
    "AlignedMTL",
    "AsyncClient",
    "CAGrad",
    "Client",
    "CombineResult",
    "Degenerate",
    "DeviceOutOfMemory",
    "DualProj",
    "FairGrad",
    "GradVac",
    "GradweightError",
    "Health",
    "InternalError",
    "InvalidGradients",
    "InvalidMethod",
    "Krum",
    "MalformedBody",
    "Mean",
    "MethodInfo",
    "MethodLike",
    "MethodSpec",
    "Munba",
    "Nash",
    "NashMTL",
    "NoWeighting",
    "NonFinite",
    "NotReady",
    "Overloaded",
    "PCGrad",
    "PayloadTooLarge",
    "RemoteWeighting",
    "Retry",
    "Simple",
    "Sum",
    "TransportError",
    "UPGrad",
    "Unauthorized",
    "UnsupportedMediaType",
    "WeightsResult",
    "__version__",
    "apply_grads",
    "parse_method",
]


def __getattr__(name: str) -> object:
    """`gradweight.GradientWeightingMethodRemote` is imported on first use: it needs vision_unlearning."""
    if name == "GradientWeightingMethodRemote":
        from .vision_unlearning import GradientWeightingMethodRemote

        return GradientWeightingMethodRemote
    raise AttributeError(f"module 'gradweight' has no attribute {name!r}")
