"""`gradweight`: the service from a shell, for people with safetensors files and curl habits.

Exit codes: 0 success, 1 the server answered an error, 2 bad usage or input file, 3 the server could
not be reached, 4 the server is up but not ready. `--url`/`--token` default to GRADWEIGHT_URL and
GRADWEIGHT_TOKEN.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import mmap
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .client import Client
from .errors import APIError, GradweightError, TransportError
from .retry import Retry
from .wire import FLOAT_NAMES

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_TRANSPORT, EXIT_NOT_READY = 0, 1, 2, 3, 4
DEFAULT_URL = "http://127.0.0.1:8000"


class UsageError(Exception):
    """Bad arguments or input files: exit code 2."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"server URL (GRADWEIGHT_URL, {DEFAULT_URL})"
    )
    common.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (GRADWEIGHT_TOKEN)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per try (300)")
    common.add_argument(
        "--retries",
        type=int,
        default=argparse.SUPPRESS,
        help="most retries on 503/connection failures (default: as many as fit in 60 s; health: 0)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )

    p = argparse.ArgumentParser(
        prog="gradweight",
        description=__doc__,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("combine", parents=[common], help="combine two safetensors files of gradients")
    c.add_argument("--forget", type=Path, help="safetensors file, tensors named <key>")
    c.add_argument("--retain", type=Path, help="safetensors file with the same keys and shapes")
    c.add_argument(
        "--group",
        action="append",
        metavar="NAME=FILE",
        help="one group of a multi-task method (repeat, in gram order) instead of --forget/--retain",
    )
    c.add_argument("--method", required=True, help='a name (munba) or a JSON spec (\'{"name": "simple"}\')')
    c.add_argument("--layout", choices=["flat", "params"], default="flat")
    c.add_argument("--dtype", choices=FLOAT_NAMES)
    c.add_argument("--state", help="opaque state from the previous step (stateful methods)")
    c.add_argument("-o", "--output", type=Path, help="write the result here (a safetensors file)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar for large transfers")

    w = sub.add_parser("weights", parents=[common], help="weights from a gram matrix")
    w.add_argument("--gram", required=True, help="JSON k x k matrix, rows in --groups order")
    w.add_argument("--method", required=True, help="a name or a JSON spec")
    w.add_argument("--groups", help="comma-separated group names (default retain,forget)")
    w.add_argument("--state", help="opaque state from the previous step")

    sub.add_parser("methods", parents=[common], help="list the server's methods")
    sub.add_parser("health", parents=[common], help="liveness and readiness")
    sub.add_parser("info", parents=[common], help="server version, device and limits")
    return p


def _client(args: argparse.Namespace, *, progress: bool = False, retries: int | None = None) -> Client:
    """A client from the arguments and environment; `retries` is the command's default for --retries."""
    url = getattr(args, "url", None) or os.environ.get("GRADWEIGHT_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("GRADWEIGHT_TOKEN") or None
    return Client(
        url,
        token=token,
        timeout=getattr(args, "timeout", 300.0),
        retries=Retry.of(getattr(args, "retries", retries)),
        progress=progress,
    )


def _map(path: Path) -> memoryview:
    """A read-only map of the file: its tensors are sent from it without a copy."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None


def _combine(args: argparse.Namespace) -> int:
    progress = not args.no_progress and sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None
    if args.group and (args.forget or args.retain):
        raise UsageError("give --group NAME=FILE or --forget/--retain, not both")
    if args.group:
        pairs = [g.partition("=") for g in args.group]
        if any(not name or not sep or not file for name, sep, file in pairs):
            raise UsageError("--group takes NAME=FILE")
        files = [(name, Path(file)) for name, _, file in pairs]
    elif args.forget is not None:
        files = [("forget", args.forget)] + ([("retain", args.retain)] if args.retain else [])
    else:
        raise UsageError("combine needs --forget (and usually --retain), or --group NAME=FILE")
    data = {name: _map(path) for name, path in files}
    with _client(args, progress=progress) as client:
        try:
            res = client.combine_safetensors(
                data, args.method, layout=args.layout, dtype=args.dtype, state=args.state
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.output is not None:
        with args.output.open("wb") as out:
            out.write(res.data)
    dtypes = sorted({dtype for dtype, _ in res.tensors.values()})
    summary = {
        "method": res.method,
        "weights": res.weights,
        "gram": res.gram,
        "device": res.device,
        "timing": res.timing,
        "numel": res.numel,
        "dtype": dtypes[0] if len(dtypes) == 1 else None,
        "state": res.state,
        "output": str(args.output) if args.output else None,
        "request_id": res.request_id,
    }
    if getattr(args, "json", False):
        print(json.dumps(summary))
    else:
        weights = ", ".join(f"{k}={v:.6g}" for k, v in (res.weights or {}).items()) or "elementwise"
        name = res.method.get("name", "?")
        print(f"{name}: {weights}  ({res.numel} elements, {summary['dtype']}, on {res.device})")
        if args.output is not None:
            print(f"wrote {args.output}")
        if res.state is not None:
            print(f"state: {res.state}")
    return EXIT_OK


def _weights(args: argparse.Namespace) -> int:
    try:
        gram = json.loads(args.gram)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--gram is not JSON: {exc.msg}") from None
    groups = [g.strip() for g in args.groups.split(",")] if args.groups else None
    with _client(args) as client:
        res = client.weights(gram, args.method, groups=groups, state=args.state)
    if getattr(args, "json", False):
        print(json.dumps({"method": res.method, "weights": res.weights, "state": res.state}))
    else:
        print(", ".join(f"{k}={v:.9g}" for k, v in res.weights.items()))
        if res.state is not None:
            print(f"state: {res.state}")
    return EXIT_OK


def _methods(args: argparse.Namespace) -> int:
    with _client(args) as client:
        methods = client.methods()
    if getattr(args, "json", False):
        print(json.dumps([m.model_dump() for m in methods]))
        return EXIT_OK
    width = max((len(m.name) for m in methods), default=4)
    for m in methods:
        print(f"{m.name:<{width}}  {m.summary}")
    return EXIT_OK


def _health(args: argparse.Namespace) -> int:
    with _client(args, retries=0) as client:  # "is it up now?": answered at once, not after 60 s
        h = client.health()
    if getattr(args, "json", False):
        print(json.dumps({"live": h.live, "ready": h.ready, **h.detail}))
    else:
        print("ready" if h.ready else "live, not ready")
    return EXIT_OK if h.ready else EXIT_NOT_READY


def _info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.info()
    print(json.dumps(info, indent=None if getattr(args, "json", False) else 2))
    return EXIT_OK


COMMANDS = {"combine": _combine, "weights": _weights, "methods": _methods, "health": _health, "info": _info}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gradweight` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"gradweight: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except APIError as exc:
        rid = f" (request {exc.request_id})" if exc.request_id else ""
        print(f"gradweight: the server refused: {exc.detail} [{exc.status} {exc.code}]{rid}", file=sys.stderr)
        return EXIT_API
    except TransportError as exc:
        print(f"gradweight: cannot reach the server: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT
    except GradweightError as exc:
        print(f"gradweight: {exc}", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        return 130
