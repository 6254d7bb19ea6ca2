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
    MalformedReply,
    NonFinite,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    TransportError,
    Unauthorized,
    UnsupportedMediaType,
)
from .methods import (
    CRMOGM,
    IMTLG,
    MGDA,
    PCD,
    AlignedMTL,
    CAGrad,
    ConFIG,
    Constant,
    DualProj,
    ExcessMTL,
    FairGrad,
    GradDrop,
    GradVac,
    Krum,
    Mean,
    MethodSpec,
    MoDo,
    Munba,
    Nash,
    NashMTL,
    NoWeighting,
    PCGrad,
    Random,
    SDMGrad,
    Simple,
    Sum,
    TrimmedMean,
    UPGrad,
    parse_method,
)
from .remote import RemoteWeighting, apply_grads
from .retry import Retry
from .types import CombineResult, FileResult, Health, MethodInfo, WeightsResult

__all__ = [
    "CRMOGM",
    "IMTLG",
    "MGDA",
    "PCD",
    "RETRYABLE",
    "APIError",
    "AlignedMTL",
    "AsyncClient",
    "CAGrad",
    "Client",
    "CombineResult",
    "ConFIG",
    "Constant",
    "Degenerate",
    "DeviceOutOfMemory",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "FileResult",
    "GradDrop",
    "GradVac",
    "GradweightError",
    "Health",
    "InternalError",
    "InvalidGradients",
    "InvalidMethod",
    "Krum",
    "MalformedBody",
    "MalformedReply",
    "Mean",
    "MethodInfo",
    "MethodLike",
    "MethodSpec",
    "MoDo",
    "Munba",
    "Nash",
    "NashMTL",
    "NoWeighting",
    "NonFinite",
    "NotReady",
    "Overloaded",
    "PCGrad",
    "PayloadTooLarge",
    "Random",
    "RemoteWeighting",
    "Retry",
    "SDMGrad",
    "Simple",
    "Sum",
    "TransportError",
    "TrimmedMean",
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
