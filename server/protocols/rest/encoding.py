"""Request bodies sent compressed (``Content-Encoding``) to the Open Inference Protocol's routes,
as Triton's clients can send them (TorchServe's own APIs hand a handler the bytes as they came).

``tritonclient`` (``request_compression_algorithm="gzip"`` or ``"deflate"``) and other HTTP
clients compress the whole body and say so in ``Content-Encoding``; the Open Inference
Protocol's ``Inference-Header-Content-Length`` then counts the uncompressed JSON header, as on
Triton. :func:`decoded` gives back the body as sent before compression, never more than the
body limit (``max_request_size``: a small body that inflates past it is refused with 413, so a
compression bomb costs at most the limit, in a worker thread: never on the event loop), and
refuses an encoding it does not know (415) or data that does not decompress (400), naming it.
"""

from __future__ import annotations

import zlib

from server.core.errors import ErrorKind, OspreyError

__all__ = ["decoded"]

_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # deflate: the zlib format (RFC 9110), raw deflate accepted too


def codings(header: str) -> list[str]:
    """The codings of a Content-Encoding header, in the order they were applied (identity left out)."""
    return [c for c in (part.strip().lower() for part in header.split(",")) if c and c != "identity"]


def decoded(body: bytes, header: str, limit: int) -> bytes:
    """``body`` with the codings of ``header`` undone (last applied, first undone)."""
    for coding in reversed(codings(header)):
        wbits = _WBITS.get(coding)
        if wbits is None:
            raise OspreyError(ErrorKind.BAD_INPUT, f"Content-Encoding {coding!r} is not supported; send the body "
                                                   f"uncompressed, gzip or deflate", status=415)
        body = _inflate(body, coding, wbits, limit)
    return body


def _inflate(body: bytes, coding: str, wbits: int, limit: int) -> bytes:
    for bits in ((wbits, -15) if coding == "deflate" else (wbits,)):
        try:
            return _members(body, coding, bits, limit)
        except zlib.error as exc:
            if bits != -15 and coding == "deflate":
                continue  # not the zlib format: try raw deflate, which some clients send
            raise OspreyError(ErrorKind.BAD_INPUT, f"the body is not valid {coding} data (Content-Encoding): "
                                                   f"{exc}") from None
    raise AssertionError("unreachable")


def _members(data: bytes, coding: str, bits: int, limit: int) -> bytes:
    """Every member of ``data`` inflated (gzip allows several, one after another: RFC 1952), all
    of them counted against ``limit``."""
    out: list[bytes] = []
    size = 0
    while True:
        d = zlib.decompressobj(bits)
        part = d.decompress(data, limit + 1 - size)
        size += len(part)
        out.append(part)
        if size > limit or d.unconsumed_tail:
            raise OspreyError(ErrorKind.TOO_LARGE, f"Request body is larger than the {limit} bytes allowed "
                                                   f"(max_request_size) once decompressed ({coding})")
        if not d.eof:
            raise OspreyError(ErrorKind.BAD_INPUT, f"the body is truncated {coding} data (Content-Encoding): "
                                                   f"it ends before the compressed stream does")
        data = d.unused_data
        if not data or bits != 31:  # (zlib and raw deflate hold one stream)
            return b"".join(out)
