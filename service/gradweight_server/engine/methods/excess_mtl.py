"""`excess_mtl`: listed, not served. torchjd's ExcessMTLWeighting keeps the running sum of the squared
gradients, k x n numbers (n the model size), from step to step; as JSON `state` that is about 20 bytes
per number, and even as tensors in the bodies it would double what every request and reply carries.
docs/PROTOCOL.md ("Methods not served") gives the argument."""

from __future__ import annotations

from gradweight.methods import ExcessMTL

from ._method import Method

METHOD = Method(
    ExcessMTL,
    torchjd="ExcessMTLWeighting",
    unavailable=(
        "not served: its state is the k x n running sum of squared gradients (n the model size), "
        "too large for the JSON `state`; see docs/PROTOCOL.md"
    ),
)
