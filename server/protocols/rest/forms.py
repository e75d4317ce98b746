"""Request bodies to named fields, as TorchServe hands them to handlers.

multipart/form-data: one field per part (with the part's content type);
application/x-www-form-urlencoded: one field per key; anything else: one ``body`` field.
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qsl

from server.core.errors import ErrorKind, OspreyError
from server.core.types import Field

__all__ = ["fields_from_body"]


def _multipart(body: bytes, content_type: str) -> dict[str, Field]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    msg = BytesParser(policy=HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise OspreyError(ErrorKind.BAD_INPUT, "multipart/form-data body could not be parsed (check the boundary)")
    out: dict[str, Field] = {}
    for i, part in enumerate(msg.iter_parts()):
        name = part.get_param("name", header="content-disposition") or f"part{i}"
        payload = part.get_payload(decode=True) or b""
        ctype = part.get("content-type", "")
        out[str(name)] = Field(payload, ctype.split(";")[0].strip() if ctype else "")
    return out


def fields_from_body(body: bytes, content_type: str) -> dict[str, Field]:
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct == "multipart/form-data":
        return _multipart(body, content_type)
    if ct == "application/x-www-form-urlencoded" and body:
        try:
            pairs = parse_qsl(body.decode("latin-1"), keep_blank_values=True, strict_parsing=True)
        except ValueError:
            pairs = []
        if pairs:
            return {k: Field(v.encode("latin-1")) for k, v in pairs}
        return {"body": Field(body, "")}  # curl -d with no content type: keep the body
    return {"body": Field(body, content_type)}
