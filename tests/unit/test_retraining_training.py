"""Retraining, in-process: the training contract, the gate, packaging the next version.

digits_cnn is retrained on labelled production rows of *inverted* digits (PNG requests, as
clients sent them); the retrained challenger must beat the champion on held-out inverted
digits and pass the gate, a challenger trained on shuffled labels must be rejected with its
numbers, and the packaged next version must load and answer. The tabular examples retrain
for classification (cancer_mlp) and regression (diabetes_mlp).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from server.core.archive import open_archive
from server.retraining.data import split_rows
from server.retraining.gate import evaluate, score_rows
from server.retraining.package import stage, write_version
from server.retraining.search import draws
from server.retraining.training import EntryPointError, TrainingError, run_training
from tests.builtin_models import example_store


def _extract(archive: Path, dest: Path) -> Path:
    opened = open_archive(archive)
    try:
        shutil.copytree(opened.model_dir, dest)
    finally:
        opened.cleanup()
    return dest


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    store = example_store("digits_cnn")
    return store / "digits_cnn.mar", _extract(store / "digits_cnn.mar", tmp_path_factory.mktemp("champion") / "digits_cnn")


def _digit_rows(invert: bool) -> list[dict]:
    from examples.common import split
    from examples.digits_cnn import digit_png, load_data

    images, labels = load_data()
    _, x_te, _, y_te = split(images, labels, seed=0)
    return [{"rid": f"r{i}", "ts": float(i), "inputs": {"body": digit_png(16.0 - g if invert else g)},
             "label": str(int(y))} for i, (g, y) in enumerate(zip(x_te, y_te))]


@pytest.fixture(scope="module")
def inverted_rows():
    """Held-out digits, inverted (white ink on black turns black on white), as PNG requests
    with their labels as clients send feedback (class names)."""
    return _digit_rows(invert=True)


def _copy_with(champion: Path, dest: Path, files: dict[str, str]) -> Path:
    shutil.copytree(champion, dest)
    for name, text in files.items():
        (dest / name).write_text(text)
    return dest


# --- the contract -------------------------------------------------------------------------


def test_an_unusable_entry_point_is_an_error_naming_it(digits, inverted_rows, tmp_path):
    _, champ = digits
    rows = inverted_rows[:20]
    with pytest.raises(EntryPointError, match="no_such_module.*not found"):
        run_training(champ, rows, tmp_path / "a", entry_point="no_such_module:retrain")
    with pytest.raises(EntryPointError, match="examples.digits_cnn:nope.*has no 'nope'"):
        run_training(champ, rows, tmp_path / "b", entry_point="examples.digits_cnn:nope")
    with pytest.raises(EntryPointError, match="'retrain_everything' must be 'module:function'"):
        run_training(champ, rows, tmp_path / "c", entry_point="retrain_everything")


def test_an_entry_point_that_raises_fails_with_its_traceback(digits, inverted_rows, tmp_path):
    _, champ = digits
    archive = _copy_with(champ, tmp_path / "arch", {"train_raise.py": (
        "def helper(ctx):\n    raise ValueError('boom: %d rows' % len(ctx.rows))\n\n"
        "def retrain(ctx):\n    ctx.log('starting')\n    return helper(ctx)\n")})
    lines = []
    with pytest.raises(TrainingError) as info:
        run_training(archive, inverted_rows[:20], tmp_path / "out", entry_point="train_raise:retrain", log=lines.append)
    err = info.value
    assert "train_raise:retrain raised ValueError: boom: 16 rows" in err.message  # 20 rows less the validation split
    assert "train_raise.py" in err.traceback and "in helper" in err.traceback
    assert "starting" in lines and any("ValueError: boom" in line for line in lines)  # the job's log has it


def test_an_entry_point_must_return_loadable_weights(digits, inverted_rows, tmp_path):
    _, champ = digits
    archive = _copy_with(champ, tmp_path / "arch", {"train_bad.py": (
        "def nothing(ctx):\n    pass\n\n"
        "def missing(ctx):\n    return {'weights': ctx.out_dir / 'never_written.pt'}\n\n"
        "def garbage(ctx):\n    p = ctx.out_dir / 'digits_cnn.pt'\n    p.write_bytes(b'not a model')\n"
        "    return {'weights': p}\n")})
    rows = inverted_rows[:20]
    with pytest.raises(TrainingError, match="train_bad:nothing returned nothing.*\"weights\""):
        run_training(archive, rows, tmp_path / "a", entry_point="train_bad:nothing")
    with pytest.raises(TrainingError, match="never_written.pt does not exist"):
        run_training(archive, rows, tmp_path / "b", entry_point="train_bad:missing")
    with pytest.raises(TrainingError, match="cannot load the new weights digits_cnn.pt.*TorchScript"):
        run_training(archive, rows, tmp_path / "c", entry_point="train_bad:garbage")


def test_search_trains_each_draw_and_keeps_the_best_on_validation(digits, inverted_rows, tmp_path):
    """Trials that either keep the champion's weights or write an untrained network: the
    search scores both through the handler on the validation split and keeps the trained one."""
    _, champ = digits
    archive = _copy_with(champ, tmp_path / "arch", {"train_pick.py": (
        "import shutil, torch\n"
        "from examples.networks.digits_cnn import DigitsCNN\n\n"
        "def retrain(ctx):\n"
        "    p = ctx.out_dir / 'digits_cnn.pt'\n"
        "    if ctx.hyperparameters['keep']:\n"
        "        shutil.copy(ctx.archive_dir / 'digits_cnn.pt', p)\n"
        "    else:\n"
        "        torch.manual_seed(1)\n"
        "        torch.jit.script(DigitsCNN().eval()).save(str(p))\n"
        "    ctx.progress(1.0, 'done')\n"
        "    return {'weights': p}\n")})
    # upright digits: the champion knows them
    from examples.digits_cnn import digit_png, load_data

    images, labels = load_data()
    rows = [{"rid": f"u{i}", "ts": 0.0, "inputs": {"body": digit_png(images[i])}, "label": int(labels[i])}
            for i in range(60)]
    seen = []
    from server.core.retraining_config import parse_retraining

    config = parse_retraining({"entry_point": "train_pick:retrain",  # the model-config.yaml section, parsed
                               "search": {"trials": 2, "method": "grid", "space": {"keep": [False, True]}}})
    res = run_training(archive, rows, tmp_path / "out", config=config, progress=lambda f, m="": seen.append((f, m)))
    assert res.hyperparameters == {"keep": True}
    assert [t["hyperparameters"] for t in res.trials] == [{"keep": False}, {"keep": True}]
    assert res.trials[1]["validation"]["accuracy"] > res.trials[0]["validation"]["accuracy"]
    assert res.weights == tmp_path / "out" / "trial-1" / "digits_cnn.pt"
    assert res.validation_rows == 12 and res.rows == 48
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("trial 2/2") for _, m in seen)


def test_search_draws_are_bounded_seeded_and_checked():
    grid = draws({"trials": 3, "method": "grid", "space": {"a": [1, 2], "b": ["x", "y"]}})
    assert grid == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}]
    one = draws({"trials": 4, "method": "random", "seed": 3, "space": {"a": [1, 2], "b": ["x", "y"]}})
    assert one == draws({"trials": 4, "method": "random", "seed": 3, "space": {"a": [1, 2], "b": ["x", "y"]}})
    assert len({repr(sorted(d.items())) for d in one}) == 4  # no repeat while unused combinations remain
    ranged = draws({"trials": 5, "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}})
    assert all(1e-4 <= d["lr"] <= 1e-2 for d in ranged)
    with pytest.raises(ValueError, match="search.space.lr: a range needs method random"):
        draws({"trials": 2, "method": "grid", "space": {"lr": {"low": 1, "high": 2}}})
    with pytest.raises(ValueError, match="search.space.epochs must be a non-empty list"):
        draws({"trials": 2, "space": {"epochs": []}})
    assert draws(None) == [] and draws({"trials": 0}) == []


# --- digits_cnn: retrain on inverted digits, gate, package ---------------------------------


@pytest.fixture(scope="module")
def retrained(digits, inverted_rows, tmp_path_factory):
    mar, champ = digits
    train, hold = split_rows(inverted_rows, 0.3, seed=1)
    out = tmp_path_factory.mktemp("retrained")
    progress = []
    res = run_training(champ, train, out, progress=lambda f, m="": progress.append((f, m)))
    return res, train, hold, progress


def test_digits_cnn_retrains_on_inverted_digits_and_passes_the_gate(digits, retrained, tmp_path):
    mar, champ = digits
    res, train, hold, progress = retrained
    assert res.entry_point == "examples.digits_cnn:retrain"  # training.json's
    assert res.weights.is_file() and res.rows + res.validation_rows == len(train)
    assert res.validation["accuracy"] >= 0.8  # scored through the handler on inverted PNGs
    assert any("epoch 12/12" in m for _, m in progress) and progress[-1][0] == 1.0

    challenger = stage(champ, res.weights, tmp_path / "challenger", version="2.0", reference=res.reference)
    gate = evaluate(champ, challenger, hold, gate_cfg={"min_improvement": 0.2})
    assert gate.passed, gate.reasons
    h = gate.numbers["holdout"]
    assert h["rows"] == len(hold) and h["scored"] == len(hold)
    assert h["champion"]["accuracy"] < 0.5 and h["challenger"]["accuracy"] >= 0.85
    assert gate.numbers["metric"] == "accuracy" and gate.numbers["golden"]["rows"] == 500
    assert gate.numbers["golden"]["challenger"]["accuracy"] >= gate.numbers["golden"]["champion"]["accuracy"] - 0.02
    assert set(gate.numbers["latency"]) == {"1", "32"} and gate.numbers["size_bytes"]["ratio"] < 2


def test_a_worse_challenger_is_rejected_with_its_numbers(digits, tmp_path):
    """Trained on shuffled labels: worse on fresh (upright) rows and on the golden set."""
    _, champ = digits
    archive = _copy_with(champ, tmp_path / "arch", {"train_shuffled.py": (
        "import numpy as np\n"
        "from examples.digits_cnn import retrain as real\n\n"
        "def retrain(ctx):\n"
        "    rng = np.random.default_rng(0)\n"
        "    labels = rng.permutation([r['label'] for r in ctx.rows])\n"
        "    ctx.rows = [dict(r, label=str(l)) for r, l in zip(ctx.rows, labels)]\n"
        "    ctx.reference = dict(ctx.reference, targets=rng.permutation(ctx.reference['targets']))\n"
        "    return real(ctx)\n")})
    train, hold = split_rows(_digit_rows(invert=False), 0.3, seed=1)
    res = run_training(archive, train, tmp_path / "out", entry_point="train_shuffled:retrain",
                       hyperparameters={"epochs": 4})
    challenger = stage(champ, res.weights, tmp_path / "challenger", version="2.0")
    gate = evaluate(champ, challenger, hold, gate_cfg={"max_latency_ratio": 1000})
    assert not gate.passed
    text = "\n".join(gate.reasons)
    assert gate.numbers["holdout"]["challenger"]["accuracy"] < gate.numbers["holdout"]["champion"]["accuracy"] - 0.5
    assert "holdout: accuracy" in text and "does not improve by at least 0.01" in text
    assert "golden: accuracy" in text and "regresses by" in text and "(at most 0.02 allowed)" in text
    golden = gate.numbers["golden"]
    assert golden["challenger"]["accuracy"] < golden["champion"]["accuracy"] - 0.02


def test_the_next_version_is_a_loadable_archive_with_the_new_reference(digits, retrained, tmp_path):
    mar, champ = digits
    res, train, hold, _ = retrained
    out = tmp_path / "store" / "digits_cnn-2.0.mar"
    metrics = {"accuracy": 0.9}
    path = write_version(mar, res.weights, "2.0", out, {"batchSize": 8}, metrics=metrics, reference=res.reference,
                         info={"rows": res.rows, "entry_point": res.entry_point})
    assert path == out and sorted(p.name for p in out.parent.iterdir()) == ["digits_cnn-2.0.mar"]  # no leftovers
    with zipfile.ZipFile(out) as zf:  # torch-model-archiver's layout: files at the root
        names = set(zf.namelist())
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        training = json.loads(zf.read("training.json"))
        profile = json.loads(zf.read("osprey-profile.json"))
    assert {"digits_cnn.pt", "index_to_name.json", "model-config.yaml", "reference.npz", "training.json"} <= names
    assert manifest["model"]["modelVersion"] == "2.0" and manifest["model"]["serializedFile"] == "digits_cnn.pt"
    assert manifest["model"]["handler"] == "image_classifier" and manifest["runtime"] == "python"
    assert training["heldout_metrics"] == metrics and training["retrained"]["from_version"] == "1.0"
    assert training["entry_point"] == "examples.digits_cnn:retrain"
    assert profile["version"] == "2.0" and profile["quality"]["accuracy"] == 0.9
    opened = open_archive(out)
    try:
        assert opened.version == "2.0" and opened.config["batchSize"] == 8
        assert opened.config["handler"]["topk"] == 3  # the rest of model-config.yaml kept
        with np.load(opened.model_dir / "reference.npz") as ref:
            assert len(ref["inputs"]) == len(res.reference["inputs"]) > 500  # reference + production rows
        scored = score_rows(opened.model_dir, hold)
        assert scored["rows"] == len(hold) and scored["accuracy"] >= 0.85  # it answers, and well
    finally:
        opened.cleanup()


# --- tabular: classification and regression -----------------------------------------------


def _tabular_rows(store: Path, name: str, labels_as) -> list[dict]:
    held = np.load(store / "samples" / f"{name}_heldout.npz")
    features = list(json.loads((store / "samples" / f"{name}_record.json").read_text()))
    return [{"rid": f"{name}-{i}", "ts": 0.0, "inputs": {"body": {f: float(v) for f, v in zip(features, x)}},
             "label": labels_as(y)} for i, (x, y) in enumerate(zip(held["x"], held["y"]))]


def test_cancer_mlp_retrains_as_a_classifier(tmp_path):
    store = example_store("cancer_mlp")
    names = ["malignant", "benign"]
    rows = _tabular_rows(store, "cancer", lambda y: names[int(y)])  # feedback by class name
    # requests of two records labelled with a list of two, and some labelled with a list of one
    pairs = [{"rid": f"pair-{i}", "ts": 0.0, "inputs": {"body": [rows[2 * i]["inputs"]["body"],
                                                                 rows[2 * i + 1]["inputs"]["body"]]},
              "label": [rows[2 * i]["label"], rows[2 * i + 1]["label"]]} for i in range(10)]
    rows = pairs + [dict(r, label=[r["label"]]) for r in rows[20:25]] + rows[25:]
    train, hold = split_rows(rows, 0.3, seed=0)
    res = run_training(store / "cancer_mlp.mar", train, tmp_path / "out")
    assert res.entry_point == "examples.tabular:retrain_cancer" and res.weights.name == "cancer_mlp.pt"
    assert res.validation["accuracy"] >= 0.85
    challenger = stage(store / "cancer_mlp.mar", res.weights, tmp_path / "chal", reference=res.reference)
    gate = evaluate(store / "cancer_mlp.mar", challenger, hold)
    h = gate.numbers["holdout"]
    assert gate.numbers["metric"] == "accuracy" and h["scored"] == len(hold)
    assert h["challenger"]["accuracy"] >= 0.85
    if not gate.passed:  # the champion is already good on unshifted data: no 0.01 to gain is a fair rejection
        assert any(r.startswith("holdout: accuracy") for r in gate.reasons)


def test_diabetes_mlp_retrains_as_a_regression_on_shifted_targets(tmp_path):
    """The target moved (+60): retraining on the new labels lowers the holdout MSE a lot; the
    golden set (the old targets) then regresses, and the gate says so."""
    store = example_store("diabetes_mlp")
    rows = _tabular_rows(store, "diabetes", lambda y: float(y) + 60.0)
    train, hold = split_rows(rows, 0.3, seed=0)
    res = run_training(store / "diabetes_mlp.mar", train, tmp_path / "out", hyperparameters={"row_weight": 8})
    assert res.entry_point == "examples.tabular:retrain_diabetes" and res.weights.suffix == ".pt2"
    out = write_version(store / "diabetes_mlp.mar", res.weights, "2.0", tmp_path / "diabetes_mlp-2.0.mar",
                        reference=res.reference)
    gate = evaluate(store / "diabetes_mlp.mar", out, hold)
    h = gate.numbers["holdout"]
    assert gate.numbers["metric"] == "mse" and gate.numbers["direction"] == "lower"
    assert h["challenger"]["mse"] < h["champion"]["mse"] * 0.8 and h["change"] > 0.2
    assert not gate.passed and any(r.startswith("golden: mse") for r in gate.reasons)


def test_next_version_and_bad_rows_are_named():
    from server.retraining.data import RowError, resolve_labels, split_rows
    from server.retraining.package import next_version

    assert next_version("1.0") == "2.0" and next_version("1.0", ["2.0", "3.0"]) == "4.0"
    assert next_version("7") == "8.0" and next_version("beta") == "beta.1"
    rows = [{"rid": "a", "label": "3"}, {"rid": "b", "label": "seven"}]
    with pytest.raises(RowError, match="row b: label 'seven' is not a class of this model"):
        resolve_labels(rows, "classification", [str(i) for i in range(10)])
    assert resolve_labels([{"rid": "c", "label": 2.5}], "regression", None) == [2.5]
    rest, held = split_rows([{"rid": str(i)} for i in range(10)], 0.3, seed=0)
    assert len(held) == 3 and len(rest) == 7 and {r["rid"] for r in rest + held} == {str(i) for i in range(10)}
    assert split_rows([{"rid": str(i)} for i in range(10)], 0.3, seed=0) == (rest, held)  # seeded


def test_rows_whose_label_the_model_cannot_take_are_left_out_and_named():
    from server.retraining.data import usable_rows

    digits = [str(i) for i in range(10)]
    rows = [{"rid": "a", "label": "3"}, {"rid": "b", "label": "cat"}, {"rid": "c", "label": ["1", "2"]},
            {"rid": "d", "label": ["1", 11]}, {"rid": "e", "label": 7}]
    kept, dropped = usable_rows(rows, "classification", digits)
    assert [r["rid"] for r in kept] == ["a", "c", "e"]
    assert dropped == [f"row b: label 'cat' is not a class of this model (one of {digits})",
                       "row d: label 11 is not a class of this model: it has 10 classes "
                       f"({digits})"]
    kept, dropped = usable_rows([{"rid": "r", "label": [1.5, 2]}, {"rid": "s", "label": "high"}], "regression", None)
    assert [r["rid"] for r in kept] == ["r"] and dropped == [
        "row s: label 'high' is a string; this model is a regression, send a number"]
    kept, dropped = usable_rows([{"rid": "t", "label": ["a", "b"]}], "embedding", None)
    assert len(kept) == 1 and dropped == []
    assert usable_rows(rows, None, None) == (rows, [])  # a task that says nothing of its labels: all kept


def test_rows_whose_labels_are_not_one_per_example_are_left_out_and_named():
    """A label per record: a request of one record labelled with a list of two, or one of two
    records labelled with one label or three, would fail the whole retraining job when it reads
    them; the champion's handler counts each request's examples, and those rows are left out."""
    from server.retraining.data import usable_rows
    from server.retraining.serving import LoadedModel

    store = example_store("cancer_mlp")
    names = ["malignant", "benign"]
    one = _tabular_rows(store, "cancer", lambda y: names[int(y)])[:6]
    pair = [one[0]["inputs"]["body"], one[1]["inputs"]["body"]]
    rows = [one[2], dict(one[3], label=[one[3]["label"]]),  # a label, a list of one: kept
            dict(one[4], label=["benign", "malignant"]),  # one record, two labels
            {"rid": "pair-ok", "ts": 0.0, "inputs": {"body": pair}, "label": ["benign", "malignant"]},
            {"rid": "pair-one", "ts": 0.0, "inputs": {"body": pair}, "label": "benign"},
            {"rid": "pair-three", "ts": 0.0, "inputs": {"body": pair}, "label": ["benign", "benign", "malignant"]}]
    with LoadedModel(store / "cancer_mlp.mar") as champion:
        counts = champion.example_counts(rows)
        assert counts == [1, 1, 1, 2, 2, 2]
        kept, dropped = usable_rows(rows, champion.task, champion.classes, counts)
    assert [r["rid"] for r in kept] == [one[2]["rid"], one[3]["rid"], "pair-ok"]
    assert dropped == [f"row {one[4]['rid']}: its request holds one example but its label is a list of 2",
                       "row pair-one: its request holds 2 examples; its label must be a list of 2",
                       "row pair-three: its request holds 2 examples; its label must be a list of 2"]


def test_an_improvement_of_a_row_or_two_is_not_evidence_but_a_clear_one_is():
    """The gate's paired bootstrap: on 60 held-out rows, a challenger right on 2 more rows than
    the champion (+0.033 accuracy, above min_improvement) is better in too few resamples to
    pass; one right on 20 more is better in all of them."""
    from server.retraining.gate import better_share
    from server.retraining.serving import Predictions

    labels = ["a" if i % 2 else "b" for i in range(60)]
    rows = [{"rid": str(i), "inputs": {}, "label": y} for i, y in enumerate(labels)]

    def model(right: set[int]) -> Predictions:
        out = {}
        for i, y in enumerate(labels):
            guess = y if i in right else ("b" if y == "a" else "a")
            out[i] = np.asarray([[0.9, 0.1] if guess == "a" else [0.1, 0.9]])
        return Predictions(task="classification", classes=("a", "b"), outputs=out)

    champion = model(set(range(28)))
    barely = model(set(range(30)))
    clearly = model(set(range(48)))
    both = list(range(60))
    share_barely = better_share(champion, barely, rows, both, None, "accuracy", True)
    share_clearly = better_share(champion, clearly, rows, both, None, "accuracy", True)
    assert share_barely < 0.9, share_barely
    assert share_clearly == 1.0, share_clearly
    # deterministic: the same rows give the same share
    assert better_share(champion, barely, rows, both, None, "accuracy", True) == share_barely


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_each_bootstrap_resample_scores_the_metric_as_the_whole_gate_does(task):
    """The bootstrap computes one metric per resample from labels resolved once: the same value
    as the gate's full scoring of the same drawn rows (repeats included), for every metric."""
    from server.retraining.gate import _examples, _metric_of, score
    from server.retraining.serving import Predictions

    rng = np.random.default_rng(3)
    n = 50
    if task == "classification":
        classes = ("a", "b", "c")
        logits = rng.normal(size=(n, 3))
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        rows = [{"rid": str(i), "inputs": {}, "label": classes[int(rng.integers(0, 3))]} for i in range(n)]
        pred = Predictions(task=task, classes=classes, outputs={i: probs[i:i + 1] for i in range(n)})
        metrics = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
    else:
        values = rng.normal(size=n)
        rows = [{"rid": str(i), "inputs": {}, "label": float(values[i] + rng.normal())} for i in range(n)]
        pred = Predictions(task=task, outputs={i: values[i:i + 1] for i in range(n)})
        metrics = ("mse", "mae", "r2")
    both = list(range(0, n, 2)) + [1, 3]
    examples = _examples(pred, rows, both)
    for _ in range(5):
        picks = rng.integers(0, len(both), len(both)).tolist()
        full = score(pred, rows, [both[k] for k in picks])
        for metric in metrics:
            assert _metric_of(task, metric, examples, picks) == full[metric], metric


def test_a_slower_challenger_is_rejected_on_latency_and_an_identical_one_is_not(tmp_path):
    """The latency check compares the fastest runs, the models taking turns, and times a failing
    size again before it rejects: an identical challenger passes it on a busy machine, one that
    sleeps 5 ms in forward() is rejected with its numbers."""
    store = example_store("cancer_mlp")
    champ = _extract(store / "cancer_mlp.mar", tmp_path / "champion")
    same = _extract(store / "cancer_mlp.mar", tmp_path / "same")
    source = (champ / "cancer_mlp.py").read_text()
    slow = _copy_with(champ, tmp_path / "slow", {"cancer_mlp.py": source + (
        "\n\nimport time\n_forward = CancerMLP.forward\n\n"
        "def _slow_forward(self, x):\n    time.sleep(0.005)\n    return _forward(self, x)\n\n"
        "CancerMLP.forward = _slow_forward\n")})
    names = ["malignant", "benign"]
    hold = _tabular_rows(store, "cancer", lambda y: names[int(y)])[:64]
    cfg = {"min_improvement": -1.0}  # quality cannot improve: only latency and size are judged here

    identical = evaluate(champ, same, hold, gate_cfg=cfg)
    assert identical.passed, identical.reasons
    assert set(identical.numbers["latency"]) == {"1", "32"}

    slower = evaluate(champ, slow, hold, gate_cfg=cfg)
    assert not slower.passed
    assert [r for r in slower.reasons if not r.startswith("latency: ")] == []
    assert any(r.startswith("latency: a batch of 1 takes") and "(at most 1.5x allowed)" in r for r in slower.reasons)
    lat = slower.numbers["latency"]["1"]
    assert lat["challenger_s"] >= 0.005 and lat["ratio"] > 1.5
