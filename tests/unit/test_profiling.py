"""Reference profiles: reading reference data, writing the profile into archives, the CLI."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from server.profiling import PROFILE_NAME, ReferenceError, read_reference_data, write_member
from tests.models import mlp_archive

ROOT = Path(__file__).resolve().parents[2]


class _Run:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _osprey(*args: str, cwd: Path) -> _Run:
    """The ``osprey`` command line, run in this process (torch is loaded once for all tests)."""
    import contextlib
    import io
    import os

    from server.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(here)
    return _Run(code, out.getvalue(), err.getvalue())


def test_each_reference_form_gives_request_bodies(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "b.png").write_bytes(b"\x89PNG two")
    (folder / "a.png").write_bytes(b"\x89PNG one")
    assert read_reference_data(folder) == [(str(folder / "a.png"), b"\x89PNG one"), (str(folder / "b.png"), b"\x89PNG two")]

    jl = tmp_path / "bodies.jsonl"
    jl.write_text('[1, 2]\n\n{"text": "hi"}\n')
    assert [b for _, b in read_reference_data(jl)] == [[1, 2], {"text": "hi"}]
    assert read_reference_data(jl)[1][0] == f"{jl}:3"

    csv = tmp_path / "records.csv"
    csv.write_text("age,sex,city\n41,2,Oslo\n7.5,1,\n")
    bodies = [b for _, b in read_reference_data(csv)]
    assert bodies == [{"age": 41, "sex": 2, "city": "Oslo"}, {"age": 7.5, "sex": 1, "city": None}]

    npz = tmp_path / "tensors.npz"
    np.savez(npz, inputs=np.arange(6, dtype=np.float32).reshape(3, 2), targets=np.arange(3))
    assert [b for _, b in read_reference_data(npz)] == [[0, 1], [2, 3], [4, 5]]
    texts = tmp_path / "texts.npz"
    np.savez(texts, np.array(["one text", "another"]))
    assert [b for _, b in read_reference_data(texts)] == ["one text", "another"]
    assert len(read_reference_data(npz, limit=2)) == 2


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", "[1]\n{oops\n", "line 2 is not JSON"),
    ("wide.csv", "a,b\n1,2,3\n", "row 2 has more values"),
    ("data.txt", "hello", "must be a folder of files, .jsonl, .csv or .npz"),
    ("empty.jsonl", "\n", "holds no requests"),
])
def test_unusable_reference_data_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ReferenceError, match=message) as err:
        read_reference_data(path)
    assert str(path) in str(err.value)


def test_an_npz_without_inputs_names_its_arrays(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, x=np.zeros(2), y=np.zeros(2))
    with pytest.raises(ReferenceError, match="needs an 'inputs' array .* has x, y"):
        read_reference_data(path)
    with pytest.raises(ReferenceError, match="no such file"):
        read_reference_data(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("fmt", ["default", "tgz", "no-archive"])
def test_a_member_is_written_beside_the_manifest_and_replaced(tmp_path, fmt):
    from server.core.archive import open_archive

    archive = mlp_archive(tmp_path / "store", fmt=fmt)
    write_member(archive, PROFILE_NAME, b'{"first": 1}')
    write_member(archive, PROFILE_NAME, b'{"second": 2}')
    opened = open_archive(archive, tmp_path / "work")
    try:
        assert json.loads((Path(opened.model_dir) / PROFILE_NAME).read_text()) == {"second": 2}
        assert (Path(opened.model_dir) / "mlp.pt").is_file()  # the rest is kept
    finally:
        opened.cleanup()
    if fmt == "default":
        names = zipfile.ZipFile(archive).namelist()
        assert names.count(PROFILE_NAME) == 1
    elif fmt == "tgz":
        with tarfile.open(archive) as tf:
            assert sum(m.name.endswith(PROFILE_NAME) for m in tf.getmembers()) == 1


def test_osprey_profile_stores_a_profile_the_monitor_loads(tmp_path):
    from monitoring.drift.profile import load_profile
    from server.core.archive import open_archive

    archive = mlp_archive(tmp_path / "store")
    rng = np.random.default_rng(0)
    ref = tmp_path / "requests.jsonl"
    ref.write_text("".join(json.dumps(row) + "\n" for row in rng.normal(size=(300, 16)).round(4).tolist()))
    r = _osprey("profile", str(archive), "--reference-data", str(ref), "--batch-size", "32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "profile of 300 reference rows" in r.stdout
    opened = open_archive(archive, tmp_path / "work")
    try:
        profile = load_profile(opened.model_dir)
    finally:
        opened.cleanup()
    assert profile["rows"] == 300 and profile["source"] == str(ref)
    assert profile["model"] == "mlp" and profile["version"] == "1.0"
    assert profile["features"], "the handler's outputs give prediction features at least"


def test_a_row_the_handler_refuses_fails_naming_file_and_row(tmp_path):
    archive = mlp_archive(tmp_path / "store")
    before = archive.read_bytes()
    ref = tmp_path / "requests.jsonl"
    ref.write_text(json.dumps([0.0] * 16) + "\n" + json.dumps(["not", "numbers"]) + "\n")
    r = _osprey("profile", str(archive), "--reference-data", str(ref), cwd=tmp_path)
    assert r.returncode == 1
    assert f"{ref}:2" in r.stderr
    assert archive.read_bytes() == before  # unchanged


def test_package_with_reference_data(tmp_path):
    from tests.models import MLP_HANDLER, make_mlp

    make_mlp(tmp_path / "mlp.pt")
    (tmp_path / "h.py").write_text(MLP_HANDLER)
    ref = tmp_path / "requests.jsonl"
    ref.write_text("".join(json.dumps([float(i % 7)] * 16) + "\n" for i in range(50)))
    args = ["package", "--model-name", "m", "--serialized-file", "mlp.pt", "--handler", "h.py",
            "--export-path", "out"]
    r = _osprey(*args, "--reference-data", str(ref), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert PROFILE_NAME in zipfile.ZipFile(tmp_path / "out" / "m.mar").namelist()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"text"\n')
    r = _osprey(*args, "--force", "--reference-data", str(bad), cwd=tmp_path)
    assert r.returncode == 1 and f"{bad}:1" in r.stderr
    assert not (tmp_path / "out" / "m.mar").exists()  # no archive without its profile
