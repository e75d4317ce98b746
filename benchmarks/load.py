"""Closed-loop HTTP load with Debian's ``hey``: warm-up, then one measured run, parsed.

``hey -z DURATION -c CONCURRENCY -m POST -T TYPE -D BODY URL`` keeps CONCURRENCY
keep-alive connections each with one request outstanding. hey prints latencies in seconds
with 4 decimals (0.1 ms resolution); for sub-millisecond medians the benchmark also runs
its own driver (``openloop.py --closed``) with microsecond timing.
"""

from __future__ import annotations

import re
import shutil
import subprocess

__all__ = ["hey", "hey_command", "parse_hey", "HEY"]

HEY = shutil.which("hey") or "hey"


def hey_command(url: str, body: str, content_type: str, concurrency: int, duration_s: float) -> list[str]:
    return [HEY, "-z", f"{duration_s:g}s", "-c", str(concurrency), "-m", "POST", "-T", content_type, "-D", body, url]


_SUMMARY = {"total_s": r"Total:\s+([\d.]+) secs", "slowest_s": r"Slowest:\s+([\d.]+) secs",
            "fastest_s": r"Fastest:\s+([\d.]+) secs", "mean_s": r"Average:\s+([\d.]+) secs",
            "rps": r"Requests/sec:\s+([\d.]+)"}


def parse_hey(text: str) -> dict:
    out: dict = {}
    for key, pattern in _SUMMARY.items():
        m = re.search(pattern, text)
        out[key] = float(m.group(1)) if m else None
    for pct, secs in re.findall(r"^\s+(\d+)%+ in ([\d.]+) secs", text, re.M):
        out[f"p{pct}_ms"] = float(secs) * 1000
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    out["status"] = codes
    out["ok"] = codes.get(200, 0)
    out["n"] = sum(codes.values())
    errors = re.findall(r"^\s+\[(\d+)\]\s+(.*)$", text.split("Error distribution:")[1], re.M) \
        if "Error distribution:" in text else []
    out["errors"] = sum(int(n) for n, _ in errors) + (out["n"] - out["ok"])
    if errors:
        out["error_sample"] = errors[0][1][:200]
    if out["mean_s"] is not None:
        out["mean_ms"] = out.pop("mean_s") * 1000
    return out


def hey(url: str, body: str, content_type: str, concurrency: int, duration_s: float, warmup_s: float) -> dict:
    """Warm up, then measure; returns throughput (ok answers only) and latency percentiles in ms."""
    if warmup_s > 0:
        subprocess.run(hey_command(url, body, content_type, concurrency, warmup_s), capture_output=True,
                       timeout=warmup_s + 120)
    cmd = hey_command(url, body, content_type, concurrency, duration_s)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 300)
    result = parse_hey(proc.stdout)
    if result["total_s"]:
        result["rps"] = result["ok"] / result["total_s"]  # count only successful answers
    result["command"] = " ".join(cmd)
    return result
