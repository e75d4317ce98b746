"""The retraining: section of model-config.yaml: defaults, checks, and errors that name the key."""

import pytest

from server.core.errors import ErrorKind, OspreyError
from server.core.model_config import parse_model_config
from server.core.retraining_config import RetrainingConfig, parse_retraining


def test_absent_section_means_no_retraining_and_true_means_defaults():
    assert parse_model_config({}).retraining is None
    assert parse_retraining(False) is None
    cfg = parse_retraining(True)
    assert cfg == RetrainingConfig()
    assert cfg.triggers == ("drift", "quality", "manual", "alert")  # latency off by default
    assert cfg.cooldown_s == 3600 and cfg.promotion.policy == "canary" and cfg.promotion.canary_share == 0.1


def test_a_full_section_is_read_with_its_yaml_names():
    cfg = parse_model_config({"retraining": {
        "triggers": ["drift", "latency", "drift"], "cooldown": 60, "min_labels": 50, "holdout": 0.25,
        "entry_point": "examples.digits_cnn:retrain", "hyperparameters": {"epochs": 3},
        "search": {"trials": 3, "method": "grid", "space": {"lr": [0.001, 0.003]}},
        "gate": {"metric": "f1", "min_improvement": 0.02, "max_regression": 0.01, "scorer": "mine:judge"},
        "promotion": {"policy": "shadow", "canary_share": 0.2, "min_requests": 10, "probation": 20},
        "backoff": 1, "timeout": 120}}).retraining
    assert cfg.triggers == ("drift", "latency") and cfg.cooldown_s == 60 and cfg.min_labels == 50
    assert cfg.search.space == {"lr": (0.001, 0.003)} and cfg.search.method == "grid"
    assert cfg.gate.metric == "f1" and cfg.gate.scorer == "mine:judge" and cfg.promotion.policy == "shadow"
    assert cfg.promotion.probation_s == 20
    assert cfg.backoff_s == 1 and cfg.timeout_s == 120


@pytest.mark.parametrize("section, named", [
    ({"gate": {"min_improvment": 0.1}}, "retraining.gate.min_improvment"),
    ({"triggers": ["drift", "rain"]}, "retraining.triggers"),
    ({"cooldown": -1}, "retraining.cooldown"),
    ({"holdout": 1.5}, "retraining.holdout"),
    ({"promotion": {"policy": "yolo"}}, "retraining.promotion.policy"),
    ({"promotion": {"canary_share": 0}}, "retraining.promotion.canary_share"),
    ({"promotion": {"min_seconds": 10, "max_seconds": 5}}, "max_seconds"),
    ({"search": {"trials": 2}}, "has trials but no space"),
    ({"search": {"trials": 2, "space": {"lr": []}}}, "retraining.search.space.lr"),
    ({"entry_point": "no_colon"}, "retraining.entry_point"),
    ({"gate": {"scorer": "judge"}}, "retraining.gate.scorer must be 'module:function'"),
    ({"gate": {"confidence": 1.5}}, "retraining.gate.confidence"),
    ({"min_labels": "many"}, "retraining.min_labels"),
    ({"min_labels": 2.5}, "retraining.min_labels"),
    ("yes", "retraining must be a mapping"),
    ({"bogus": 1}, "retraining.bogus"),
])
def test_bad_values_are_refused_naming_the_key(section, named):
    with pytest.raises(OspreyError) as e:
        parse_model_config({"retraining": section})
    assert e.value.kind is ErrorKind.BAD_INPUT
    assert named in str(e.value)
