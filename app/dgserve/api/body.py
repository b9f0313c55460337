"""Reading request bodies with the size limit enforced as they stream in.

A declared ``Content-Length`` over the limit is refused before reading, and counting
stops the read as soon as the limit is passed, so nothing unbounded is ever buffered.
Every protocol front-end reads its body here.
"""

from __future__ import annotations

from fastapi import Request

from dgserve.api.multipart import parse_multipart
from dgserve.errors import InvalidRequestError, PayloadTooLargeError
from dgserve.serving.decode import ALLOWED_CONTENT_TYPES, check_content_type
from dgserve.serving.service import Upload
from dgserve.settings import Settings

__all__ = ["read_body", "read_uploads"]

# Multipart parts often arrive untyped (curl without ;type=, files without an extension);
# their bytes are sniffed by the decoder, which only accepts the allowed formats anyway.
_UNTYPED_PARTS = {"", "application/octet-stream"}


def _check_declared(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes exceeds the limit of {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or ``PayloadTooLargeError`` (413) once it passes ``limit`` bytes."""
    _check_declared(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        if not chunk:
            continue  # Starlette's stream ends with an empty chunk
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body exceeds the limit of {limit} bytes")
    # One copy at most: a body that came as one bytes chunk is not copied at all.
    if len(chunks) == 1 and type(chunks[0]) is bytes:
        return chunks[0]
    return b"".join(chunks)  # b"" for no chunks


async def read_uploads(
    request: Request, settings: Settings, content_types: frozenset[str] = ALLOWED_CONTENT_TYPES
) -> list[Upload]:
    """One image as the body (``Content-Type: image/*``), or the file parts of a multipart body.

    ``content_types`` are the media types the task takes (``Task.content_types``; images by default).
    """
    limit = settings.max_body_bytes
    _check_declared(request, limit)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
        return await _read_multipart(request, limit, settings.max_images_per_request, content_types)
    media_type = check_content_type(content_type, allowed=content_types)
    return [Upload(None, await read_body(request, limit), media_type)]


async def _read_multipart(request: Request, limit: int, max_parts: int, content_types: frozenset[str]) -> list[Upload]:
    parts = parse_multipart(await read_body(request, limit), request.headers.get("content-type", ""),
                            max_files=max_parts, max_fields=max_parts)  # fmt: skip
    uploads = []
    for index, part in enumerate(parts):
        if part.filename is None:
            continue  # plain form fields carry no image; tolerated, ignored
        name = part.filename or part.field or f"#{index}"
        media_type = part.content_type.split(";", 1)[0].strip().lower()
        if media_type not in _UNTYPED_PARTS:
            check_content_type(media_type, name, content_types)
        uploads.append(Upload(name, part.data, media_type))
    if not uploads:
        raise InvalidRequestError("the multipart body has no file parts; send each image as a file")
    return uploads
