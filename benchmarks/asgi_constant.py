"""The ceiling of Python's HTTP stack here: a bare uvicorn (httptools + uvloop) ASGI app
that reads the body and answers a constant JSON list, no model, no framework.

    python -m benchmarks.asgi_constant --port 8000
"""

from __future__ import annotations

import argparse

import uvicorn

__all__ = ["app"]

BODY = b"[0.1,0.2,0.3,0.4]"
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        msg = await receive()
        more = msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="off",
                http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
