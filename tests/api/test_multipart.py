"""The in-memory multipart parser gives what Starlette's form parser gives, on good and broken bodies."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from dgserve.api.multipart import parse_multipart
from dgserve.errors import MalformedBodyError

BOUNDARY = "XyZ-7"
TYPE = f"multipart/form-data; boundary={BOUNDARY}"
LIMIT = 3
Parsed = tuple[str, list[tuple[str, str | None, str, bytes]]]


def body(*parts: tuple[bytes, bytes], end: bool = True) -> bytes:
    out = b"".join(f"--{BOUNDARY}\r\n".encode() + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    return out + (f"--{BOUNDARY}--\r\n".encode() if end else b"")


def file(name: str, filename: str, data: bytes, media: bytes = b"") -> tuple[bytes, bytes]:
    head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode()
    return (head + (b"\r\nContent-Type: " + media if media else b""), data)


ONE = file("images", "a.jpg", b"\xff\xd8 jpeg bytes", b"image/jpeg")
CASES: dict[str, tuple[bytes, str]] = {
    "one file": (body(ONE), TYPE),
    "a field then two files, one with CRLF and a fake boundary inside": (body(
        (b'Content-Disposition: form-data; name="note"', b"hello"),
        file("images", "a.png", b"P1", b"image/png"),
        (b'content-disposition: form-data; name="images"; filename="b.png"\r\ncontent-type: IMAGE/PNG; q=1',
         b"P2\r\n--not-the-boundary\r\n"),
    ), TYPE),  # fmt: skip
    "quoted boundary": (body(ONE), f'multipart/form-data; boundary="{BOUNDARY}"'),
    "utf-8 file name": (body(file("images", "ünï.jpg", b"x")), TYPE),
    "latin-1 file name": (body(('Content-Disposition: form-data; name="i"; filename="é.jpg"'.encode("latin-1"), b"x")), TYPE),
    "empty file name": (body(file("images", "", b"x")), TYPE),
    "no closing boundary": (body(ONE, end=False), TYPE),
    "empty body": (b"", TYPE),
    "three files": (body(*[file("i", f"{n}.png", b"x") for n in range(3)]), TYPE),
    # broken: every one of these is a 400
    "no name": (body((b'Content-Disposition: form-data; filename="a.jpg"', b"x")), TYPE),
    "no Content-Disposition": (body((b"Content-Type: image/png", b"x")), TYPE),
    "no boundary": (body(ONE), "multipart/form-data"),
    "not multipart at all": (b"hello world", TYPE),
    "a preamble": (b"junk\r\n" + body(ONE), TYPE),
    "LF line ends": (body(ONE).replace(b"\r\n", b"\n"), TYPE),
    "too many files": (body(*[file("i", f"{n}.png", b"x") for n in range(LIMIT + 1)]), TYPE),
    "too many fields": (body(*[(b'Content-Disposition: form-data; name="f"', b"v")] * (LIMIT + 1)), TYPE),
}


async def _starlette(data: bytes, content_type: str) -> Parsed:
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())], "app": None}
    try:
        # Starlette leaves the temporary file of a part that never ends unclosed; that is
        # its leak, not the behaviour compared here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            form = await Request(scope, receive).form(max_files=LIMIT, max_fields=LIMIT)
            gc.collect()
    except HTTPException as exc:
        assert exc.status_code == 400
        return "400", []
    parts = []
    for field, value in form.multi_items():
        if isinstance(value, str):
            parts.append((field, None, "", b""))
        else:
            parts.append((field, value.filename, value.content_type or "", await value.read()))
    await form.close()
    return "ok", parts


def _ours(data: bytes, content_type: str) -> Parsed:
    try:
        parts = parse_multipart(data, content_type, max_files=LIMIT, max_fields=LIMIT)
    except MalformedBodyError as exc:
        assert exc.status_code == 400 and exc.code == "bad_request"
        return "400", []
    return "ok", [(p.field, p.filename, p.content_type, p.data) for p in parts]


@pytest.mark.parametrize("case", CASES)
def test_parts_and_refusals_are_starlettes(case: str) -> None:
    data, content_type = CASES[case]
    assert _ours(data, content_type) == asyncio.run(_starlette(data, content_type))


def test_the_cases_cover_both_outcomes() -> None:
    outcomes = {case: _ours(*CASES[case])[0] for case in CASES}
    assert outcomes["one file"] == "ok" and outcomes["no boundary"] == "400"
    status, parts = _ours(*CASES["a field then two files, one with CRLF and a fake boundary inside"])
    assert [(p[0], p[1]) for p in parts] == [("note", None), ("images", "a.png"), ("images", "b.png")]
    assert parts[2][2:] == ("IMAGE/PNG; q=1", b"P2\r\n--not-the-boundary\r\n")
    assert parts[0][3] == b""  # a plain field's value is never kept
