"""Interleaved A/B of two Osprey commits on the same machine: did a change move the request path?

    .venv/bin/python -m benchmarks.ab OLD NEW [--rounds 3] [--seconds 6] [--concurrency 32]
        [--models mlp,mlp_nb] [--old-env KEY=VALUE ...] [--new-env KEY=VALUE ...]

Each commit is checked out into a detached worktree under ``benchmarks/.work/ab/``; both
serve the same archives (by default the tiny MLP with batching on, ``mlp``, and off,
``mlp_nb``; also ``cnn`` and ``digits_cnn_builtin``; built by ``benchmarks/models.py``).
``--old-env``/``--new-env`` give one side's server extra environment (a setting as
``OSPREY_<FIELD>``), so a commit can be compared with itself under two settings. Rounds
alternate the order (A B, then B A, ...) so a drift in the machine's load hits both sides
alike; each point is ``hey -z SECONDS -c C`` after a 2-second warm-up. Prints a Markdown
table (req/s per round, means and the change) and writes the raw numbers, with the
environments, to ``benchmarks/results/ab-OLD-NEW.json``. The machine is shared and noisy:
read only paired differences that hold in every round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from . import load
from .models import build_models
from .systems import Osprey

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class OspreyAt(Osprey):
    """Osprey from another checkout of the repository (its code on PYTHONPATH)."""

    def __init__(self, tree: Path, *args, extra_env: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree = tree
        self.extra_env = dict(extra_env or {})

    def command(self):
        cmd, env, cwd = super().command()
        env["PYTHONPATH"] = str(self.tree)
        env.update(self.extra_env)
        return cmd, env, cwd


def key_values(items: list[str], flag: str, error) -> dict[str, str]:
    """``KEY=VALUE`` command-line items as a dict; ``error(message)`` for one without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            error(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def checkout(rev: str, work: Path) -> tuple[str, Path]:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = work / sha
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return sha, tree


def add_side_arguments(ap: argparse.ArgumentParser) -> None:
    """OLD, NEW, ``--work`` and each side's ``--old-env``/``--new-env`` (this tool's and startup_ab's)."""
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--work", default=str(HERE / ".work" / "ab"))
    ap.add_argument("--old-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for OLD's server only (e.g. OSPREY_MONITORING=false); repeatable")
    ap.add_argument("--new-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for NEW's server only; repeatable")


def sides_of(args: argparse.Namespace, error) -> list[tuple[str, str, Path, dict[str, str]]]:
    """(label, sha, tree, env) of OLD and NEW, each checked out under ``args.work``; ``error(message)``
    when both are the same commit with the same environment."""
    envs = [key_values(given, "--old-env/--new-env", error) for given in (args.old_env, args.new_env)]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sides = []
    for rev, env in ((args.old, envs[0]), (args.new, envs[1])):
        sha, tree = checkout(rev, work)
        # a side is its commit and its environment: the same commit with and without a setting is an A/B too
        label = sha + "".join(f" {k}={v}" for k, v in env.items())
        sides.append((label, sha, tree, env))
    if sides[0][0] == sides[1][0]:
        error("OLD and NEW are the same commit with the same environment: nothing to compare")
    return sides


def result_name(sides) -> str:
    """The two sides' labels as one file name part."""
    return "-".join(label.replace(" ", "_").replace("=", "-") for label, *_ in sides)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_side_arguments(ap)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--models", default="mlp,mlp_nb",
                    help="comma-separated: mlp, mlp_nb, cnn (ResNet-18-sized, slow), digits_cnn_builtin, digits_cnn")
    args = ap.parse_args(argv)
    sides = sides_of(args, ap.error)
    work = Path(args.work)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    models = build_models(work / "models", with_cnn="cnn" in names, with_digits=any(n.startswith("digits") for n in names))
    unknown = [n for n in names if n not in models]
    if unknown or not names:
        ap.error(f"--models: {', '.join(unknown) or 'none given'}; known: {', '.join(models)}")
    pair = [models[n] for n in names]
    results: dict[str, dict[str, list[float]]] = {label: {m.name: [] for m in pair} for label, *_ in sides}
    for r in range(args.rounds):
        for i, (label, sha, tree, env) in enumerate(sides if r % 2 == 0 else sides[::-1]):
            server = OspreyAt(tree, work / f"run-{sha}-{r}-{i}", pair, tag=f"osprey-{sha}", extra_env=env).start()
            try:
                for m in pair:
                    out = load.hey(server.predict_url(m.name), str(m.body), m.content_type, args.concurrency,
                                   args.seconds, 2.0)
                    results[label][m.name].append(round(out["rps"] or 0.0, 1))
            finally:
                server.stop()
    old, new = sides[0][0], sides[1][0]
    lines = ["| round | " + " | ".join(f"{s} {m}" for m in names for s in (old, new)) + " |",
             "|---|" + "---|" * (2 * len(names))]
    for r in range(args.rounds):
        lines.append(f"| {r + 1} | " + " | ".join(f"{results[s][m][r]:,.0f}" for m in names
                                                  for s in (old, new)) + " |")
    means = {s: {m: statistics.mean(v) for m, v in results[s].items()} for s in (old, new)}
    cells = []
    for m in names:
        change = (means[new][m] / means[old][m] - 1) * 100 if means[old][m] else float("nan")
        cells += [f"{means[old][m]:,.0f}", f"{means[new][m]:,.0f} ({change:+.0f}%)"]
    lines.append("| mean | " + " | ".join(cells) + " |")
    print(f"hey -z {args.seconds:g}s -c {args.concurrency}, {args.rounds} interleaved rounds")
    print("\n".join(lines))
    # (a concurrency other than the default in the name: runs of one pair at several don't overwrite)
    at = "" if args.concurrency == ap.get_default("concurrency") else f"-c{args.concurrency}"
    out = HERE / "results" / f"ab-{result_name(sides)}{at}.json"
    out.write_text(json.dumps({"old": old, "new": new, "concurrency": args.concurrency, "seconds": args.seconds,
                               "env": {label: env for label, _, _, env in sides}, "rps": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
