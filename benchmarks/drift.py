"""Drift detection, false alarms and live quality of Osprey's monitor (benchmarks/DRIFT.md).

    python -m benchmarks.drift                       # everything, writes benchmarks/DRIFT.md
    python -m benchmarks.drift --windows 10          # a short run

One real ``osprey serve`` with the examples (built by ``osprey examples``, profiles included),
monitoring at its defaults (windows of 500, episode after 2 of 3 drifted windows, PSI):

1. **False alarms.** Per model, ``--windows`` windows (default 40) of in-distribution traffic
   (the held-out split, never the training rows): drifted windows and episodes, from the
   monitor's own ``GET /monitoring`` history.
2. **Detection.** Per shift of issue 11: the model is re-registered (fresh monitoring state),
   one clean window of held-out traffic, then shifted traffic in steps of 100 requests until
   the episode opens: requests after the shift began (goal: within 1,000); for tabular shifts,
   the shifted feature's rank among the input features.
3. **Evidently** on the same windows of the same features is ``benchmarks/drift_offline.py``
   (it replays these windows offline; Evidently stays out of the server's environment).
4. **Live quality** (digits_cnn): labels for 1,000 requests through ``POST /feedback``: live
   accuracy vs held-out accuracy; then a window with 30% of the labels corrupted:
   ``quality degraded`` within one window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import drift_data
from benchmarks.systems import Osprey

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work" / "drift"
MODELS = ("digits_cnn", "cancer_mlp", "diabetes_mlp", "text_transformer")
WINDOW = 500
STEP = 100


def _log(msg: str) -> None:
    print(f"[drift {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Client:
    def __init__(self, srv: Osprey, concurrency: int = 16):
        import httpx

        self.srv = srv
        self.http = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency))
        self.sem = asyncio.Semaphore(concurrency)

    async def predict(self, model: str, bodies: list[bytes], content_type: str) -> list[str]:
        """Send ``bodies``; return each answer's request id (the id feedback joins on)."""
        url = f"{self.srv.inference}/predictions/{model}"

        async def one(body: bytes) -> str:
            async with self.sem:
                r = await self.http.post(url, content=body, headers={"content-type": content_type})
                if r.status_code != 200:
                    raise RuntimeError(f"{model}: {r.status_code} {r.text[:200]}")
                return r.headers["x-request-id"]
        return list(await asyncio.gather(*(one(b) for b in bodies)))

    async def status(self, model: str) -> dict:
        r = await self.http.get(f"{self.srv.inference}/monitoring/{model}")
        r.raise_for_status()
        return r.json()

    async def settled(self, model: str, rows: int, timeout: float = 60) -> dict:
        """The status once the monitor has taken ``rows`` requests (its background thread lags)."""
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status(model)
            if st.get("requests", 0) >= rows or time.monotonic() > deadline:
                return st
            await asyncio.sleep(0.05)

    async def reregister(self, model: str) -> None:
        m = self.srv.management
        r = await self.http.delete(f"{m}/models/{model}")
        if r.status_code != 200:
            raise RuntimeError(f"unregister {model}: {r.status_code} {r.text}")
        r = await self.http.post(f"{m}/models", params={"url": f"{model}.mar", "initial_workers": 1,
                                                          "synchronous": "true"})
        if r.status_code != 200:
            raise RuntimeError(f"register {model}: {r.status_code} {r.text}")

    async def feedback(self, model: str, items: list[dict]) -> dict:
        r = await self.http.post(f"{self.srv.inference}/feedback/{model}", json={"feedback": items})
        r.raise_for_status()
        return r.json()


async def false_alarms(c: Client, store: Path, model: str, windows: int) -> dict:
    await c.reregister(model)
    ctype = drift_data.CONTENT_TYPES[model]
    sent = 0
    for w in range(windows):
        sent += len(await c.predict(model, drift_data.bodies(model, store, WINDOW, seed=1000 + w), ctype))
    st = await c.settled(model, sent)
    deadline = time.monotonic() + 30
    while len(st.get("history", [])) < windows and time.monotonic() < deadline:  # the last window's close
        await asyncio.sleep(0.1)
        st = await c.status(model)
    history = st.get("history", [])
    return {"model": model, "windows": len(history), "requests": sent,
            "drifted_windows": sum(1 for h in history if h.get("drifted")),
            "episodes": st["drift"].get("episodes", 0), "reference": st.get("reference"),
            "max_score": round(max((h.get("score", 0.0) for h in history), default=0.0), 4)}


async def detection(c: Client, store: Path, sc: drift_data.Scenario, cap: int = 3000) -> dict:
    await c.reregister(sc.model)
    ctype = drift_data.CONTENT_TYPES[sc.model]
    sent = len(await c.predict(sc.model, drift_data.bodies(sc.model, store, WINDOW, seed=7), ctype))
    shifted = 0
    st = await c.settled(sc.model, sent)
    while shifted < cap:
        sent += len(await c.predict(sc.model, sc.make(store, STEP, seed=100 + shifted), ctype))
        shifted += STEP
        st = await c.settled(sc.model, sent)
        ep = st["drift"].get("episode")
        if ep and ep.get("open"):
            break
    ep = st["drift"].get("episode")
    opened = bool(ep and ep.get("open"))
    out = {"model": sc.model, "shift": sc.name, "detected": opened, "requests_to_episode": shifted if opened else None}
    inputs = sorted((f for f in st["drift"]["features"] if f["kind"] == "input"), key=lambda f: -f["score"])
    preds = [f for f in st["drift"]["features"] if f["kind"] == "prediction"]
    out["top_features"] = [f"{f['name']} {f['score']:.3f}" for f in
                           sorted(st["drift"]["features"], key=lambda f: -f["score"])[:3]]
    if sc.shifted_feature:
        names = [f["name"] for f in inputs]
        out["shifted_feature_rank"] = names.index(sc.shifted_feature) + 1 if sc.shifted_feature in names else None
    out["prediction_drifted"] = any(f["drifted"] for f in preds)
    return out


async def live_quality(c: Client, store: Path) -> dict:
    model = "digits_cnn"
    await c.reregister(model)
    d = np.load(store / "samples" / "digits_heldout.npz")
    rng = np.random.default_rng(3)
    idx = rng.choice(len(d["labels"]), 1000)
    from examples.digits_cnn import digit_png

    ids = await c.predict(model, [digit_png(g) for g in d["images"][idx]], "image/png")
    labels = [str(int(y)) for y in d["labels"][idx]]
    await c.settled(model, len(ids))
    fb = await c.feedback(model, [{"request_id": i, "label": y} for i, y in zip(ids, labels)])
    st = await c.status(model)
    clean = {"feedback": fb, "metrics": st["quality"].get("metrics"), "baseline": st["quality"].get("baseline"),
             "degraded": st["quality"].get("degraded")}
    # 30% of the labels of the next window corrupted
    idx2 = rng.choice(len(d["labels"]), WINDOW)
    ids2 = await c.predict(model, [digit_png(g) for g in d["images"][idx2]], "image/png")
    await c.settled(model, len(ids) + len(ids2))
    true = d["labels"][idx2]
    wrong = rng.random(len(true)) < 0.3
    corrupted = np.where(wrong, (true + rng.integers(1, 10, len(true))) % 10, true)
    fb2 = await c.feedback(model, [{"request_id": i, "label": str(int(y))} for i, y in zip(ids2, corrupted)])
    st2 = await c.status(model)
    return {"clean": clean, "corrupted": {"feedback": fb2, "metrics": st2["quality"].get("metrics"),
                                          "degraded": st2["quality"].get("degraded")}}


async def run_osprey(store: Path, windows: int, models: list[str]) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    bench_models = [_bench_model(store, m) for m in models]
    srv = Osprey(WORK / "osprey", bench_models, extra_args=["--enable-model-api"]).start(timeout=300)
    try:
        c = Client(srv)
        out = {"false_alarms": [], "detection": [], "quality": None}
        for m in models:
            _log(f"{m}: {windows} in-distribution windows")
            out["false_alarms"].append(await false_alarms(c, store, m, windows))
        for sc in drift_data.SCENARIOS:
            if sc.model in models:
                _log(f"{sc.model}: {sc.name}")
                out["detection"].append(await detection(c, store, sc))
        if "digits_cnn" in models:
            _log("digits_cnn: live quality")
            out["quality"] = await live_quality(c, store)
        return out
    finally:
        srv.stop()


def _bench_model(store: Path, name: str):
    from benchmarks.models import BenchModel

    ctype = drift_data.CONTENT_TYPES[name]
    body = WORK / f"{name}.body"
    body.write_bytes(drift_data.bodies(name, store, 1, seed=0)[0])
    return BenchModel(name=name, archive=store / f"{name}.mar", body=body, content_type=ctype, kind="example")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(ROOT / "model_store"))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "drift.json"))
    args = ap.parse_args(argv)
    store = Path(args.store)
    result = asyncio.run(run_osprey(store, args.windows, args.models))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
