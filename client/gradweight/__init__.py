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
from .methods import MethodSpec, Munba, Nash, NoWeighting, Simple, parse_method
from .remote import RemoteWeighting, apply_grads
from .retry import Retry
from .types import CombineResult, Health, MethodInfo, WeightsResult

__all__ = [
    "RETRYABLE",
    "APIError",
    "AsyncClient",
    "Client",
    "CombineResult",
    "Degenerate",
    "DeviceOutOfMemory",
    "GradweightError",
    "Health",
    "InternalError",
    "InvalidGradients",
    "InvalidMethod",
    "MalformedBody",
    "MethodInfo",
    "MethodLike",
    "MethodSpec",
    "Munba",
    "Nash",
    "NoWeighting",
    "NonFinite",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RemoteWeighting",
    "Retry",
    "Simple",
    "TransportError",
    "Unauthorized",
    "UnsupportedMediaType",
    "WeightsResult",
    "__version__",
    "apply_grads",
    "parse_method",
]
