"""nginx (Debian's package) in front of gradweight-server processes, all on 127.0.0.1 free ports.

`docker/nginx/nginx.conf` runs as shipped, with only the upstream servers, the listen address, one
worker (so round robin is exact), and the paths of a non-installed nginx swapped in. Every wait is
bounded. Used by tests/scaleout/ and bench/nginx.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "docker" / "nginx" / "nginx.conf"
UPSTREAM = re.compile(r"^(\s*)server gradweight-\d+:8000 (.*);$", re.M)
READY_S = 120.0
_conftest: Any = None


def start_server(**overrides: Any) -> Any:
    """tests/conftest.py's in-thread uvicorn server on a free port (its `_start`), loaded by path: when
    the whole suite runs, `import conftest` finds another directory's conftest."""
    global _conftest
    if _conftest is None:
        spec = importlib.util.spec_from_file_location(
            "gradweight_tests_conftest", ROOT / "tests" / "conftest.py"
        )
        assert spec is not None
        assert spec.loader is not None
        _conftest = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_conftest)
    return _conftest._start(**overrides)


def nginx_bin() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, procs: Sequence[subprocess.Popen[bytes]], path: str = "/readyz") -> None:
    deadline = time.monotonic() + READY_S
    while True:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process exited before {url}{path} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}{path} not ready within {READY_S} s")
        time.sleep(0.05)


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_S
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nginx did not listen on {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def replicas(
    n: int, env: dict[str, str] | None = None
) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """`n` gradweight-server processes (CPU), started together; yields (process, url) pairs."""
    exe = Path(sys.executable).with_name("gradweight-server")
    base = {**os.environ, "GRADWEIGHT_LOG_LEVEL": "warning", "GRADWEIGHT_DEVICE": "cpu", **(env or {})}
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for _ in range(n):
            port = free_port()
            proc = subprocess.Popen(
                [str(exe), "--host", "127.0.0.1", "--port", str(port)],
                env=base,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started.append((proc, f"http://127.0.0.1:{port}"))
        for _, url in started:
            wait_ready(url, [p for p, _ in started])
        yield started
    finally:
        for proc, _ in started:
            stop(proc)


def config(upstreams: Sequence[str], port: int, workdir: Path) -> str:
    """The shipped config with these upstreams and port, and paths under `workdir`."""
    text = NGINX_CONF.read_text()
    lines = iter(upstreams)

    def server(m: re.Match[str]) -> str:
        return f"{m[1]}server {next(lines).removeprefix('http://')} {m[2]};"

    text, count = UPSTREAM.subn(server, text)
    if count != len(upstreams):
        raise ValueError(f"nginx.conf has {count} upstream servers, the test {len(upstreams)}")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("worker_processes auto;", "worker_processes 1;")
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the temporary directory
    temp = "".join(
        f"    {kind}_temp_path {workdir / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp, 1)
    return f"{user}pid {workdir / 'nginx.pid'};\ndaemon off;\n{text}"


@contextlib.contextmanager
def nginx(upstreams: Sequence[str], *, ready: bool = True) -> Iterator[str]:
    """nginx in front of `upstreams`; yields its URL once /readyz answers through it (or, without
    `ready`, once nginx listens)."""
    exe = nginx_bin()
    if exe is None:
        raise RuntimeError("nginx is not installed (`make test` installs Debian's package)")
    with tempfile.TemporaryDirectory(prefix="gw-nginx-") as tmp:
        work = Path(tmp)
        port = free_port()
        conf = work / "nginx.conf"
        conf.write_text(config(upstreams, port, work))
        log = work / "error.log"
        proc = subprocess.Popen(
            [exe, "-p", str(work), "-c", str(conf), "-e", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(url, [proc]) if ready else wait_listening(port, proc)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"{exc}; nginx said: {log.read_text()[-2000:] if log.exists() else ''}"
                ) from None
            yield url
        finally:
            stop(proc)
