"""The raw ceiling: forward passes of the same TorchScript file in a tight loop, no server.

For each batch size and each torch thread count (1 and torch's default), after a warm-up,
runs forward passes for about ``--seconds`` and reports samples per second and the time of
one pass; the ceiling of a batch size is its best thread count. Runs in its own process so that nothing else
(no event loop, no other model) shares the interpreter.

    python -m benchmarks.ceiling --weights mlp.pt --shape 16 --batches 1,2,4,8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["measure", "main"]


def measure(weights: str, shape: tuple[int, ...], batches: list[int], seconds: float,
            threads: list[int] | None = None) -> dict:
    """Samples/s per batch size, each at the best of the given torch thread counts."""
    import torch

    model = torch.jit.load(weights).eval()
    threads = threads or sorted({1, torch.get_num_threads()})
    out = {"threads_tried": threads, "by_batch": {}, "by_threads": {}}
    for t in threads:
        torch.set_num_threads(t)
        out["by_threads"][str(t)] = _batches(model, shape, batches, seconds)
    for bs in map(str, batches):
        best_t = max(threads, key=lambda t: out["by_threads"][str(t)][bs]["samples_per_s"])
        out["by_batch"][bs] = dict(out["by_threads"][str(best_t)][bs], threads=best_t)
    best = max(out["by_batch"].items(), key=lambda kv: kv[1]["samples_per_s"])
    out["best_batch"] = int(best[0])
    out["best_threads"] = best[1]["threads"]
    out["best_samples_per_s"] = best[1]["samples_per_s"]
    return out


def _batches(model, shape, batches, seconds) -> dict:
    import torch

    out = {}
    with torch.inference_mode():
        for bs in batches:
            x = torch.randn(bs, *shape)
            for _ in range(3):
                model(x)
            # calibrate how many passes fill the time, then time them
            t0 = time.perf_counter()
            model(x)
            one = max(time.perf_counter() - t0, 1e-6)
            n = max(3, int(seconds / one))
            t0 = time.perf_counter()
            for _ in range(n):
                model(x)
            dt = time.perf_counter() - t0
            out[str(bs)] = {"samples_per_s": n * bs / dt, "pass_ms": dt / n * 1000, "passes": n}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--shape", required=True, help="one sample's shape, e.g. 16 or 3,224,224")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--threads", default="", help="torch thread counts to try, e.g. 1,2 (default: 1 and torch's default)")
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    threads = [int(t) for t in args.threads.split(",") if t] or None
    result = measure(args.weights, shape, [int(b) for b in args.batches.split(",")], args.seconds, threads)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
