"""The in-memory multipart parser gives what Starlette's form parser gives, on good and broken bodies,
and refuses a body cut before its closing boundary, which Starlette's parser let through short."""

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
    "only the closing boundary": (f"--{BOUNDARY}--\r\n".encode(), TYPE),
    "charset that is not a text encoding": (body(file("images", "a.jpg", b"x")), TYPE + "; charset=hex"),
    "latin-1 charset": (body(('Content-Disposition: form-data; name="i"; filename="é.jpg"'.encode("latin-1"), b"x")),
                        TYPE + "; charset=latin-1"),
    "repeated Content-Type: the first counts": (body(
        (b'Content-Disposition: form-data; name="i"; filename="a"\r\nContent-Type: image/png\r\nContent-Type: text/plain',
         b"x")), TYPE),  # fmt: skip
    "three files": (body(*[file("i", f"{n}.png", b"x") for n in range(3)]), TYPE),
    # broken: every one of these is a 400
    "no name": (body((b'Content-Disposition: form-data; filename="a.jpg"', b"x")), TYPE),
    "no Content-Disposition": (body((b"Content-Type: image/png", b"x")), TYPE),
    "no boundary": (body(ONE), "multipart/form-data"),
    "over-long boundary": (body(ONE), "multipart/form-data; boundary=" + "b" * 300),
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


CUT = {
    "no closing boundary": body(ONE, end=False),
    "cut inside a part": body(ONE)[:60],
    "empty": b"",
}


@pytest.mark.parametrize("case", CUT)
def test_a_body_cut_before_its_closing_boundary_is_refused(case: str) -> None:
    # Starlette's parser answers such a body with the parts it finished, so a client
    # could get fewer answers than the images it sent, and no error.
    assert asyncio.run(_starlette(CUT[case], TYPE))[0] == "ok"
    with pytest.raises(MalformedBodyError, match="ends before its closing boundary"):
        parse_multipart(CUT[case], TYPE, max_files=LIMIT, max_fields=LIMIT)


def test_refusals_say_why() -> None:
    def why(case: str) -> str:
        with pytest.raises(MalformedBodyError) as refused:
            parse_multipart(*CASES[case], max_files=LIMIT, max_fields=LIMIT)
        return refused.value.message

    assert "no boundary" in why("no boundary")
    assert "Boundary length 300" in why("over-long boundary")
    assert "name" in why("no name") and "name" in why("no Content-Disposition")
    assert why("too many files") == f"too many files: at most {LIMIT}"
    assert why("too many fields") == f"too many form fields: at most {LIMIT}"


def test_the_cases_cover_both_outcomes() -> None:
    outcomes = {case: _ours(*CASES[case])[0] for case in CASES}
    assert outcomes["one file"] == "ok" and outcomes["no boundary"] == "400"
    status, parts = _ours(*CASES["a field then two files, one with CRLF and a fake boundary inside"])
    assert [(p[0], p[1]) for p in parts] == [("note", None), ("images", "a.png"), ("images", "b.png")]
    assert parts[2][2:] == ("IMAGE/PNG; q=1", b"P2\r\n--not-the-boundary\r\n")
    assert parts[0][3] == b""  # a plain field's value is never kept
    assert _ours(*CASES["repeated Content-Type: the first counts"])[1][0][2] == "image/png"
    assert _ours(*CASES["charset that is not a text encoding"])[1][0][1] == "a.jpg"
