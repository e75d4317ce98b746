"""The reference profile: built from observations, written, read back, refused with a reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from monitoring.drift.profile import (PROFILE_FILE, ProfileError, build_profile, load_profile, project,
                                      save_profile, validate_profile)
from server.core.capture import Observation
from server.core.model_config import MonitoringConfig


def observations(n=1000, batches=4, seed=0, d=16):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(batches):
        m = n // batches
        basis = np.zeros((m, d))
        basis[:, 0] = rng.normal(0, 5, m)  # one dominant direction
        out.append(Observation(
            model="m", version="1", request_ids=[f"{b}-{i}" for i in range(m)], time=0.0,
            features={"age": rng.normal(50, 10, m),
                      "color": rng.choice(["red", "blue"], m, p=[0.7, 0.3]).astype(object)},
            predictions={"predicted_class": rng.choice(["0", "1"], m).astype(object),
                         "confidence": rng.uniform(0.5, 1, m)},
            categorical=frozenset({"color", "predicted_class"}),
            embedding=(basis + rng.normal(0, 0.1, (m, d))).astype(np.float32),
            task="classification", classes=("0", "1")))
    return out


def test_build_profile_has_the_plans_format():
    p = build_profile(observations(), MonitoringConfig(components=3), "test", {"accuracy": 0.9})
    assert p["format"] == "osprey-profile/1" and p["rows"] == 1000 and p["task"] == "classification"
    assert p["classes"] == ["0", "1"] and p["quality"] == {"accuracy": 0.9} and p["source"] == "test"
    names = [f["name"] for f in p["features"]]
    assert names[:2] == ["predicted_class", "confidence"]  # predictions first: always kept
    assert names[2:5] == ["embedding[0]", "embedding[1]", "embedding[2]"] and names[5:] == ["age", "color"]
    age = next(f for f in p["features"] if f["name"] == "age")
    assert age["edges"][0] == -math.inf and age["edges"][-1] == math.inf and len(age["edges"]) == 6
    assert len(age["proportions"]) == 5 and sum(age["proportions"]) == pytest.approx(1)
    assert all(0.17 < x < 0.23 for x in age["proportions"])  # quantile bins: about equal mass
    assert age["mean"] == pytest.approx(50, abs=1.5) and age["std"] == pytest.approx(10, abs=1)
    color = next(f for f in p["features"] if f["name"] == "color")
    assert color["type"] == "categorical" and color["categories"] == ["red", "blue"]
    assert color["proportions"][0] == pytest.approx(0.7, abs=0.05)
    proj = p["projection"]
    assert len(proj["components"]) == 3 and len(proj["mean"]) == 16
    assert proj["explained_variance_ratio"][0] > 0.9  # the dominant direction comes first


def test_a_constant_feature_and_an_empty_bin_keep_finite_proportions():
    obs = observations(200, batches=1)
    obs[0].features["zero"] = np.zeros(200)
    p = build_profile(obs, MonitoringConfig(components=0), "t")
    zero = next(f for f in p["features"] if f["name"] == "zero")
    assert zero["edges"] == [-math.inf, 0.0, math.inf]
    assert min(zero["proportions"]) > 0 and p["projection"] is None


def test_max_features_and_named_features_cap_the_inputs():
    p = build_profile(observations(), MonitoringConfig(components=2, max_features=3), "t")
    assert [f["name"] for f in p["features"]] == ["predicted_class", "confidence", "embedding[0]"]
    p = build_profile(observations(), MonitoringConfig(components=0, features=("color",)), "t")
    assert [f["name"] for f in p["features"]] == ["predicted_class", "confidence", "color"]


def test_save_and_load_round_trip(tmp_path):
    p = build_profile(observations(), MonitoringConfig(), "t")
    path = save_profile(p, tmp_path)
    assert path.name == PROFILE_FILE
    assert "-Infinity" in path.read_text()
    again = load_profile(tmp_path)
    assert again == json.loads(json.dumps(p))
    emb = observations(8, batches=1)[0].embedding
    assert np.allclose(project(again["projection"], emb),
                       project(p["projection"], emb))
    assert load_profile(tmp_path / "nothing") is None


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(format="v0"), "'format' must be 'osprey-profile/1'"),
    (lambda p: p.update(rows=0), "'rows' must be a whole number >= 1"),
    (lambda p: p.update(task="ranking"), "'task' must be one of"),
    (lambda p: p["features"][1].update(edges=[0.0, 1.0] + p["features"][1]["edges"][2:]),
     "feature 'confidence': 'edges' must start with -Infinity"),
    (lambda p: p["features"][1].update(proportions=[1.0]), "feature 'confidence': 6 edges need 5 proportions"),
    (lambda p: p["features"][0].update(categories=["0", "0"]), "feature 'predicted_class': 'categories' must be"),
    (lambda p: p["features"][0].update(kind="output"), "feature 'predicted_class': 'kind' must be"),
    (lambda p: p["features"][1].update(std=float("nan")), "feature 'confidence': 'std' must be a finite"),
    (lambda p: p["features"].append(dict(p["features"][0])), "feature 'predicted_class' appears twice"),
    (lambda p: p["projection"].update(components=[[1.0]]), "projection 'components' must be rows of 16"),
])
def test_validation_names_what_is_wrong(change, message):
    p = json.loads(json.dumps(build_profile(observations(), MonitoringConfig(), "t")))
    change(p)
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace("'", "'")):
        validate_profile(p)


def test_load_names_the_file_when_it_is_not_json(tmp_path):
    (tmp_path / PROFILE_FILE).write_text("{not json")
    with pytest.raises(ProfileError, match=f"{PROFILE_FILE}: not readable JSON"):
        load_profile(tmp_path)


def test_no_rows_is_refused():
    with pytest.raises(ProfileError, match="no reference rows"):
        build_profile([], MonitoringConfig(), "t")
