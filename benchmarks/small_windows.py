"""Small windows: how often the chi-square test flags a clean window, and how often it catches
a shift, at a given family-wise alpha (benchmarks/DRIFT.md, "Small windows").

    .venv/bin/python -m benchmarks.small_windows [--alphas 0.05 0.01] [--trials 200]
                                                 [--cases 100:50 500:100]

A window with fewer than ``stats.ROWS_PER_BIN`` rows per bin (150 at the default 5 bins) is
decided by the two-sample chi-square test, at the model's ``small_window_alpha`` (default
``stats.ALPHA``) with a Bonferroni correction over the features, instead of the distance
threshold (``monitoring/drift/window.py``). Such windows are what a low-traffic model gets
with ``window_seconds``, and what the tests use.

No server: the monitored features of a 16-input, 3-class MLP (the tests' classifier: inputs,
predicted class, confidence, entropy, 2 components of the penultimate activations) are built
as the ``tensor`` handler's capture builds them, and go through Osprey's own ``build_profile``,
``Layout`` and ``window.analyze``. Each trial draws a baseline of ``B`` rows and a window of
``W`` rows from one standard-normal pool (``B:W`` in ``--cases``), clean or shifted: one input
moved by 1 or 2 sd, or every input by 0.5 sd. Per alpha and case: the share of windows that
drifted. Clean, each trial scores three windows against its baseline: ``2 of 3`` is the share
of trials where at least two drifted (the default episode rule; the windows share a baseline,
so their verdicts are not independent), and ``in 40`` is 1 - (1 - that)^40, about the chance
of a false episode in 40 windows (the issue's goal for windows of 500: none in 40).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "small_windows.json"
FEATURES = 16
SHIFTS = {"clean": (0.0, 0.0), "one input +1 sd": (0.0, 1.0), "one input +2 sd": (0.0, 2.0),
          "all inputs +0.5 sd": (0.5, 0.0)}


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, 32), torch.nn.Linear(32, 3)


def _observation(layers, x: np.ndarray):
    import torch

    from server.core.capture import Observation

    first, second = layers
    with torch.no_grad():
        hidden = torch.relu(first(torch.from_numpy(x)))
        p = torch.softmax(second(hidden), 1).numpy()
    top = p.argmax(1)
    entropy = -(p * np.log(np.maximum(p, 1e-30))).sum(1)
    return Observation("m", "1", [str(i) for i in range(len(x))], 0.0,
                       features={f"INPUT0[{i}]": x[:, i].astype(np.float64) for i in range(FEATURES)},
                       predictions={"predicted_class": np.array([str(t) for t in top], dtype=object),
                                    "confidence": p[np.arange(len(p)), top].astype(np.float64),
                                    "entropy": entropy.astype(np.float64)},
                       categorical=frozenset({"predicted_class"}), embedding=hidden.numpy())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.01])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--cases", nargs="+", default=["100:50", "500:100"], help="baseline rows:window rows")
    ap.add_argument("--out", type=Path, default=OUT)  # (results/small_windows.json: the run in DRIFT.md)
    args = ap.parse_args(argv)

    import monitoring.drift.stats as stats
    from monitoring.drift.layout import Layout
    from monitoring.drift.profile import build_profile
    from monitoring.drift.window import analyze
    from server.core.model_config import MonitoringConfig

    layers = _model()
    pool = np.random.default_rng(99).normal(size=(50_000, FEATURES)).astype(np.float32)
    rows = []
    for case in args.cases:
        base_n, win = (int(v) for v in case.split(":"))
        cfg = MonitoringConfig(window=win, baseline_requests=base_n, components=2)
        if not stats.small_window(win, cfg.bins):
            raise SystemExit(f"--cases {case}: a window of {win} rows is not small at {cfg.bins} bins")
        rng = np.random.default_rng(base_n * 1000 + win)
        trials = []  # the same baselines and windows for every alpha and shift
        for _ in range(args.trials):
            x = pool[rng.choice(len(pool), base_n + 3 * win, replace=False)]
            layout = Layout(build_profile([_observation(layers, x[:base_n])], cfg, "baseline"))
            trials.append((layout, x[base_n:]))
        for name, (every, one) in SHIFTS.items():
            windows = 3 if name == "clean" else 1
            counted = []  # per trial, its windows' counts
            for layout, rest in trials:
                counted.append([])
                for k in range(windows):
                    w = rest[k * win:(k + 1) * win] + every
                    w[:, 3] += one
                    counted[-1].append(layout.count_slots(layout.slots(_observation(layers, w.astype(np.float32)))))
            for alpha in args.alphas:
                judged = dataclasses.replace(cfg, small_window_alpha=alpha)
                verdicts = np.array([[analyze(layout, c, win, 0.0, judged).drifted for c in cs]
                                     for (layout, _), cs in zip(trials, counted)])
                p = float(verdicts.mean())
                row = {"baseline": base_n, "window": win, "alpha": alpha, "case": name, "drifted": round(p, 3)}
                if name == "clean":
                    episode = float((verdicts.sum(axis=1) >= 2).mean())
                    row.update({"episode_per_window": round(episode, 4),
                                "episodes_in_40": round(1 - (1 - episode) ** 40, 3)})
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    "command": "python -m benchmarks.small_windows " + " ".join(argv or sys.argv[1:]),
                                    "trials": args.trials, "rows": rows}, indent=1) + "\n")
    print(f"| baseline:window | alpha | clean windows drifted | 2 of 3 clean drifted | about, in 40 | "
          f"{' | '.join(n for n in SHIFTS if n != 'clean')} |")
    print("|---|---|---|---|---|" + "---|" * (len(SHIFTS) - 1))
    for case in args.cases:
        base_n, win = (int(v) for v in case.split(":"))
        for alpha in args.alphas:
            got = {r["case"]: r for r in rows if (r["baseline"], r["window"], r["alpha"]) == (base_n, win, alpha)}
            clean = got["clean"]
            print(f"| {base_n}:{win} | {alpha:g} | {clean['drifted']:.3f} | {clean['episode_per_window']:.4f} | "
                  f"{clean['episodes_in_40']:.2f} | "
                  + " | ".join(f"{got[n]['drifted']:.3f}" for n in SHIFTS if n != "clean") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
