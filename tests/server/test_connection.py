"""The response head goes out with the first body bytes in one write (connection._HeadWithBody)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from gradweight_server.connection import _HeadWithBody


class FakeTransport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, parts: list[Any]) -> None:
        self.calls.append(("writelines", [bytes(p) for p in parts]))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def cycle(started: bool = True) -> SimpleNamespace:
    return SimpleNamespace(response_started=started, response_complete=False)


def test_the_head_and_a_small_body_go_out_in_one_write() -> None:
    async def main() -> list[tuple[str, Any]]:
        raw, c = FakeTransport(), cycle(started=False)
        t = _HeadWithBody(raw, c)
        t.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: straight through
        c.response_started = True
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert raw.calls == [("write", b"HTTP/1.1 100 Continue\r\n\r\n")]
        t.write(b"body")
        t.write(b"more")
        await asyncio.sleep(0)
        assert t.get_extra_info("peername") == "info:peername"
        return raw.calls

    assert asyncio.run(main())[1:] == [("write", b"HTTP/1.1 200 OK\r\n\r\nbody"), ("write", b"more")]


def test_a_large_body_is_not_copied_to_join_its_head() -> None:
    async def main() -> list[tuple[str, Any]]:
        raw = FakeTransport()
        t = _HeadWithBody(raw, cycle())
        t.write(b"head")
        t.write(memoryview(bytes(1000)))
        return raw.calls

    assert asyncio.run(main()) == [("writelines", [b"head", bytes(1000)])]


def test_a_head_with_no_body_goes_out_at_the_end_of_the_iteration_or_on_close() -> None:
    async def alone() -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        raw = FakeTransport()
        t = _HeadWithBody(raw, cycle())
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        before = list(raw.calls)
        await asyncio.sleep(0)
        return before, raw.calls

    before, after = asyncio.run(alone())
    assert before == []
    assert after == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")]

    async def closed() -> list[tuple[str, Any]]:
        raw = FakeTransport()
        t = _HeadWithBody(raw, cycle())
        t.write(b"head")
        t.close()
        await asyncio.sleep(0)
        return raw.calls

    assert asyncio.run(closed()) == [("write", b"head"), ("close", None)]
