"""Config snapshots (server/snapshots.py): the files TorchServe 0.12 writes, read and written as it does."""

from __future__ import annotations

import json
from pathlib import Path

import javaproperties
import pytest

from server.snapshots import last_snapshot, missing_archives, read_snapshot

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "torchserve_snapshots"


def test_a_snapshot_torchserve_wrote_is_read_as_it_restores_it():
    path = FIXTURES / "20261130020303075-shutdown.cfg"
    snap = read_snapshot(path)
    by_version = {m.version: m for m in snap.models}
    assert set(by_version) == {"1.0", "2.0"} and {m.name for m in snap.models} == {"noop"}
    one, two = by_version["1.0"], by_version["2.0"]
    assert (one.default, one.mar_name, one.min_workers, one.max_workers, one.batch_size, one.max_batch_delay,
            one.response_timeout, one.startup_timeout) == (False, "noop.mar", 2, 3, 4, 50, 33, 120)
    assert (two.default, two.mar_name, two.min_workers, two.max_workers) == (True, "noop2.mar", 0, 0)
    # the rest is the configuration the server had; tsConfigFile names the snapshot, as in TorchServe
    assert snap.properties["model_store"] == "/tmp/tssnap/store"
    assert snap.properties["enable_model_api"] == "true" and snap.properties["tsConfigFile"] == str(path)
    assert "model_snapshot" not in snap.properties


def test_the_newest_by_the_time_in_the_name_is_the_last_snapshot(tmp_path):
    assert last_snapshot(tmp_path / "absent") is None
    for name in ("20261130020303075-shutdown.cfg", "20261130020310158-startup.cfg", "20251231235959999-snapshot.cfg",
                 "notes.txt", "99999999999999999-snapshot.cfg"):  # no such time: not a snapshot
        (tmp_path / name).write_text("")
    (tmp_path / "20991231235959999-snapshot.cfg").mkdir()  # folders are not snapshots
    assert last_snapshot(tmp_path) == tmp_path / "20261130020310158-startup.cfg"


def test_a_broken_snapshot_is_refused_naming_the_file_and_what_is_wrong(tmp_path):
    path = tmp_path / "20261130020303075-snapshot.cfg"
    path.write_text(javaproperties.dumps({"model_snapshot": "{not json"}))
    with pytest.raises(ValueError, match=r"20261130020303075-snapshot.cfg: model_snapshot is not JSON"):
        read_snapshot(path)
    doc = {"models": {"m": {"1.0": {"defaultVersion": True, "marName": "m.mar", "minWorkers": "two"}}}}
    path.write_text(javaproperties.dumps({"model_snapshot": json.dumps(doc)}))
    with pytest.raises(ValueError, match=r"model m version 1.0: minWorkers must be a number, got 'two'"):
        read_snapshot(path)


def test_archives_no_longer_in_the_model_store_are_named(tmp_path):
    snap = read_snapshot(FIXTURES / "20261130020303075-shutdown.cfg")
    (tmp_path / "noop.mar").write_bytes(b"")
    assert [m.mar_name for m in missing_archives(snap, str(tmp_path))] == ["noop2.mar"]


def test_only_the_torchserve_command_writes_snapshots_by_default():
    from server.settings import load_settings
    from server.torchserve_cli import TORCHSERVE_DEFAULTS

    assert load_settings(None, env={}).config_snapshots is False  # osprey serve
    assert load_settings(None, env={}, defaults=TORCHSERVE_DEFAULTS).config_snapshots is True
    assert load_settings(None, env={"OSPREY_CONFIG_SNAPSHOTS": "true"}).config_snapshots is True
