"""A process that owns a job queue, for the retraining tests (``python -m tests.retraining_host``).

    submit --store S [--redis URL] --model M --episode E --params JSON [--go FILE]
        waits for FILE (so several submitters race), submits, prints {"id", "created"}
    serve --store S [--port P] [--submit-params JSON --model M --episode E]
        runs an EmbeddedJobQueue (and, with --port, the management routes for retraining jobs
        on uvicorn: the wiring serve.py does); prints "ready"; runs until killed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from server.settings import Settings


async def submit(args) -> int:
    from server.retraining.embedded import EmbeddedJobQueue
    from server.retraining.redis_queue import RedisJobQueue

    queue = RedisJobQueue(args.redis, args.store) if args.redis else EmbeddedJobQueue(args.store)
    if args.go:
        while not Path(args.go).exists():
            time.sleep(0.001)
    record, created = await queue.submit(args.model, "1.0", "drift", args.episode, json.loads(args.params))
    print(json.dumps({"id": record.id, "created": created}), flush=True)
    await queue.close()
    return 0


async def serve(args) -> int:
    from server.protocols.rest.asgi import Router
    from server.protocols.rest.retraining import add_retraining_routes
    from server.retraining.queue import job_queue

    queue = job_queue(Settings(retraining_cancel_grace=1.0), args.store)
    await queue.start()
    if args.params:
        record, created = await queue.submit(args.model, "1.0", "manual", args.episode, json.loads(args.params))
        print(json.dumps({"id": record.id, "created": created}), flush=True)
    server = None
    if args.port:
        import uvicorn

        router = Router(max_body=1 << 20)
        add_retraining_routes(router, queue)
        config = uvicorn.Config(router, host="127.0.0.1", port=args.port, lifespan="off", log_level="warning")
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)  # as serve.py does
        await server.startup()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    if server is not None:
        await server.shutdown()
    await queue.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["submit", "serve"])
    p.add_argument("--store", required=True)
    p.add_argument("--redis")
    p.add_argument("--model", default="m")
    p.add_argument("--episode", default="drift:1")
    p.add_argument("--params")
    p.add_argument("--go")
    p.add_argument("--port", type=int)
    args = p.parse_args()
    return asyncio.run(submit(args) if args.command == "submit" else serve(args))


if __name__ == "__main__":
    sys.exit(main())
