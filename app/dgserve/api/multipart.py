"""``multipart/form-data`` bodies, parsed in memory by python-multipart.

The body has been read whole under the size limit (``api/body.py``) before it gets
here, so each part is a slice of bytes already in memory. Starlette's form parser
wraps the same parser in spooled temporary files, ``UploadFile`` objects and an await
per part; on the inference path that wrapping cost more of the event loop than the
parsing itself (docs/performance.md, "The inference route's own loop time"), so the
parser's callbacks are used directly here. What a client sees is what Starlette's
parser gave (the same parts, names and media types, and a 400 for a body that is not
multipart), with one difference: a body that ends before its closing boundary is a 400
here, where Starlette's parser quietly dropped the part that never ended, so a client
could get fewer answers than the images it sent.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from dgserve.errors import MalformedBodyError

__all__ = ["Part", "parse_multipart"]


@dataclass(slots=True)
class Part:
    """One part: its form field name, its file name (None for a plain field), media type and bytes."""

    field: str
    filename: str | None
    content_type: str
    data: bytes


@dataclass(slots=True)
class _Parsing:
    charset: str
    max_files: int
    max_fields: int
    parts: list[Part] = field(default_factory=list)
    files: int = 0
    fields: int = 0
    header_name: bytes = b""
    header_value: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    current: Part | None = None
    ended: bool = False  # the closing boundary was reached

    def on_part_begin(self) -> None:
        self.headers, self.chunks, self.current = {}, [], None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        # A repeated header: the first one counts, as in Starlette's ``Headers.get``.
        self.headers.setdefault(self.header_name.lower(), self.header_value)
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition"))
        if b"name" not in options:
            raise MalformedBodyError('a multipart part has no Content-Disposition "name"')
        filename = options.get(b"filename")
        if filename is None:
            self.fields += 1
            if self.fields > self.max_fields:
                raise MalformedBodyError(f"too many form fields: at most {self.max_fields}")
        else:
            self.files += 1
            if self.files > self.max_files:
                raise MalformedBodyError(f"too many files: at most {self.max_files}")
        media_type = self.headers.get(b"content-type", b"").decode("latin-1")
        self.current = Part(self._text(options[b"name"]), None if filename is None else self._text(filename),
                            media_type, b"")  # fmt: skip

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current is not None and self.current.filename is not None:  # a plain field's value is never read
            self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self.current is not None:
            self.current.data = b"".join(self.chunks)
            self.parts.append(self.current)

    def on_end(self) -> None:
        self.ended = True

    def _text(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except (UnicodeDecodeError, LookupError):  # LookupError: a codec that is not a text encoding (hex)
            return raw.decode("latin-1")


def parse_multipart(body: bytes, content_type: str, max_files: int, max_fields: int) -> list[Part]:
    """The parts of ``body`` in order, or ``MalformedBodyError`` (400).

    ``content_type`` is the request's header, boundary included; more than ``max_files``
    file parts or ``max_fields`` plain fields is refused as Starlette's parser refuses it,
    and so is a body that ends before its closing boundary.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedBodyError("the multipart body's Content-Type has no boundary")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    parsing = _Parsing(charset, max_files, max_fields)
    try:
        # Inside the try: the parser refuses an over-long boundary as it is made.
        parser = MultipartParser(boundary, {
            "on_part_begin": parsing.on_part_begin,
            "on_part_data": parsing.on_part_data,
            "on_part_end": parsing.on_part_end,
            "on_header_field": parsing.on_header_field,
            "on_header_value": parsing.on_header_value,
            "on_header_end": parsing.on_header_end,
            "on_headers_finished": parsing.on_headers_finished,
            "on_end": parsing.on_end,
        })  # fmt: skip
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise MalformedBodyError(f"invalid multipart body: {exc}") from exc
    if not parsing.ended:
        raise MalformedBodyError("the multipart body ends before its closing boundary")
    return parsing.parts
