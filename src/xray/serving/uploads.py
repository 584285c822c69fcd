"""The HTTP side of ``POST /predict``, in the API server process: a film arrives as a multipart field or as
the raw request body and leaves as one JSON payload (``name``, base64 ``data``, ``gradcam``) that
LitServe queues for the inference worker.

The body is read only when LitServe's handler asks for it, after the API key was checked, and never
beyond ``max_bytes``; nothing of it is written to disk. What is wrong with the request itself (too
large, empty, a broken multipart body, a bad ``gradcam`` value) is answered here with a 4xx; what is
wrong with the film inside it is the worker's to find (:mod:`xray.serving.api`).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import FormData, Headers, QueryParams, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FILE_FIELD = "file"
"""The multipart field that carries the film (any single file part is taken when it is named otherwise)."""

# Starlette spools a multipart file part over ``spool_max_size`` (1 MB) into a temporary file; uploads
# stay in memory here, bounded by ``max_bytes`` instead (LitServe lifts the limit the same way on import).
MultiPartParser.spool_max_size = sys.maxsize

_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off", ""})

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)
"""Leading bytes of the raster formats the reader takes, for an upload that comes without a file name."""

UNRECOGNISED = (
    "unsupported file type: the content is none of JPEG, PNG, BMP, TIFF, WebP, GIF or DICOM "
    "(a DICOM file without its 'DICM' preamble needs its name: a multipart filename or ?filename=x.dcm)"
)


def film_name(filename: str | None, data: bytes) -> str | None:
    """The name an upload is read under: the client's file name (its extension decides, as a path's does
    in predict.py), else ``upload`` with the extension its content shows, else None (unrecognised)."""
    if filename:
        return filename
    if data[128:132] == b"DICM":
        return "upload.dcm"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "upload.webp"
    return next((f"upload{ext}" for magic, ext in _MAGIC if data.startswith(magic)), None)


def _base_name(name: str | None) -> str | None:
    """The file name without any folder a browser or client put before it, at most 255 characters."""
    if not name:
        return None
    return name.replace("\\", "/").rsplit("/", 1)[-1][-255:] or None


def _flag(key: str, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise HTTPException(400, f"{key} must be true or false, got {value[:40]!r}")


class FilmUploads:
    """ASGI middleware in front of LitServe's ``POST`` endpoint: the request's film, however it came, as
    the JSON body LitServe's handler reads (``application/json``). Other routes pass untouched."""

    def __init__(self, app: ASGIApp, api_path: str = "/predict", max_bytes: int = 50 * 2**20) -> None:
        self.app = app
        self.api_path = api_path
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.api_path:
            await self.app(scope, receive, send)
            return
        delivered = False

        async def film_as_json() -> Message:
            nonlocal delivered
            if delivered:  # after the body, only a disconnect notice is left to wait for
                return await receive()
            delivered = True
            body = json.dumps(await self.payload(scope, receive)).encode()
            return {"type": "http.request", "body": body, "more_body": False}

        kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers = [*kept, (b"content-type", b"application/json")]
        await self.app({**scope, "headers": headers}, film_as_json, send)

    async def payload(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        """``{"name": file name or None, "data": base64 of the film, "gradcam": bool}`` of one request."""
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large()
        request = Request(scope, self._bounded(receive))
        try:
            if headers.get("content-type", "").lower().startswith("multipart/form-data"):
                data, name, fields = await self._multipart(request)
            else:  # any other type is the film itself (curl --data-binary says form-urlencoded)
                data, name, fields = await request.body(), None, {}
        except ClientDisconnect:
            raise HTTPException(400, "the upload was cut short (the client disconnected)") from None
        query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        if not data:
            raise HTTPException(400, "empty upload: the request carried no film (0 bytes)")
        return {
            "name": _base_name(name or query.get("filename")),
            "data": base64.b64encode(data).decode("ascii"),
            "gradcam": _flag("gradcam", fields.get("gradcam", query.get("gradcam", "false"))),
        }

    async def _multipart(self, request: Request) -> tuple[bytes, str | None, dict[str, str]]:
        """(the file part's bytes, its file name, the text fields) of a multipart body with one file."""
        try:
            form: FormData = await request.form(max_files=1, max_fields=16)
        except HTTPException:  # over max_bytes while parsing
            raise
        except StarletteHTTPException as err:  # a broken body, or more than one file
            raise HTTPException(400, f"bad multipart upload: {err.detail}") from None
        except MultiPartException as err:
            raise HTTPException(400, f"bad multipart upload: {err.message}") from None
        try:
            files = [v for v in form.values() if isinstance(v, UploadFile)]
            if not files:
                raise HTTPException(
                    400, f"the multipart upload holds no file: send the film as the field '{FILE_FIELD}'"
                )
            named = form.get(FILE_FIELD)
            upload = named if isinstance(named, UploadFile) else files[0]
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            return await upload.read(), upload.filename, fields
        finally:
            await form.close()

    def _bounded(self, receive: Receive) -> Receive:
        """``receive`` that stops the request once its body passes ``max_bytes``."""
        total = 0

        async def bounded() -> Message:
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                raise self._too_large()
            return message

        return bounded

    def _too_large(self) -> HTTPException:
        return HTTPException(
            413, f"upload too large: over the limit of {self.max_bytes / 2**20:g} MB (max_upload_mb)"
        )
