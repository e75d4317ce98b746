"""Archives: reading the three formats, writing them, and refusing bad ones safely."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest

from server.core.archive import MANIFEST_PATH, open_archive, write_archive
from server.core.errors import ErrorKind, OspreyError

MANIFEST = {"runtime": "python", "model": {"modelName": "m", "handler": "h.py", "modelVersion": "2.0"}}


def zip_archive(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def good_members(**extra):
    return {MANIFEST_PATH: json.dumps(MANIFEST).encode(), "h.py": b"def handle(d, c): return d\n", **extra}


@pytest.mark.parametrize("fmt", ["default", "tgz", "no-archive"])
def test_written_archive_reads_back_in_every_format(tmp_path, fmt):
    (tmp_path / "h.py").write_text("def handle(d, c):\n    return d\n")
    (tmp_path / "w.pt").write_bytes(b"weights")
    (tmp_path / "cfg.yaml").write_text("batchSize: 4\nhandler:\n  topk: 3\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "vocab.txt").write_text("a\nb\n")
    out = write_archive(model_name="demo", version="1.1", handler=str(tmp_path / "h.py"),
                        serialized_file=str(tmp_path / "w.pt"), config_file=str(tmp_path / "cfg.yaml"),
                        extra_files=[str(tmp_path / "extra")], export_path=str(tmp_path / "out"), archive_format=fmt)
    a = open_archive(out, tmp_path / "work")
    try:
        assert a.name == "demo" and a.version == "1.1" and a.handler == "h.py"
        assert a.config == {"batchSize": 4, "handler": {"topk": 3}}
        assert (a.model_dir / "w.pt").read_bytes() == b"weights"
        assert (a.model_dir / "extra" / "vocab.txt").exists()
        assert a.manifest["archiverVersion"] == "0.12.0" and a.manifest["runtime"] == "python"
    finally:
        a.cleanup()


def test_write_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "h.py").write_text("")
    kw = dict(model_name="x", handler=str(tmp_path / "h.py"), export_path=str(tmp_path))
    write_archive(**kw)
    with pytest.raises(FileExistsError):
        write_archive(**kw)
    write_archive(**kw, force=True)


def test_builtin_handler_name_is_stored_as_is(tmp_path):
    out = write_archive(model_name="x", handler="image_classifier", export_path=str(tmp_path))
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read(MANIFEST_PATH))["model"]["handler"] == "image_classifier"


@pytest.mark.parametrize("members, why", [
    ({"../evil.py": b"x"}, "escape"),
    ({"/abs.py": b"x"}, "absolute"),
    ({"h.py": b"x"}, "MANIFEST"),
    ({MANIFEST_PATH: b"{not json"}, "not valid JSON"),
    ({MANIFEST_PATH: json.dumps({"model": {"modelName": "m"}}).encode()}, "handler"),
    ({MANIFEST_PATH: json.dumps({"model": {"modelName": "m", "handler": "h", "serializedFile": "w.pt"}}).encode()}, "w.pt"),
])
def test_bad_zip_archives_are_refused_with_the_reason(tmp_path, members, why):
    path = zip_archive(tmp_path / "bad.mar", members)
    with pytest.raises(OspreyError) as info:
        open_archive(path, tmp_path / "work")
    assert info.value.kind is ErrorKind.BAD_INPUT and why in info.value.message and "bad.mar" in info.value.message
    assert not (tmp_path / "evil.py").exists()
    assert not any((tmp_path / "work").iterdir())  # nothing left behind


def test_zip_symlink_member_is_refused(tmp_path):
    path = tmp_path / "link.mar"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in good_members().items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(OspreyError, match="symbolic link"):
        open_archive(path, tmp_path / "work")


def test_tar_with_link_or_traversal_is_refused(tmp_path):
    for name, kind in (("../../x", tarfile.REGTYPE), ("m/evil", tarfile.SYMTYPE)):
        path = tmp_path / "bad.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            tf.addfile(info, io.BytesIO(b""))
        with pytest.raises(OspreyError):
            open_archive(path, tmp_path / "work")


def test_size_cap_refuses_archive_bombs(tmp_path):
    path = zip_archive(tmp_path / "big.mar", good_members(**{"blob.bin": b"\0" * 200_000}))
    with pytest.raises(OspreyError, match="bytes allowed"):
        open_archive(path, tmp_path / "work", max_size=100_000)
    a = open_archive(path, tmp_path / "work", max_size=1_000_000)
    a.cleanup()


def test_not_an_archive(tmp_path):
    (tmp_path / "junk.mar").write_bytes(b"hello world")
    with pytest.raises(OspreyError, match="not a zip"):
        open_archive(tmp_path / "junk.mar", tmp_path / "work")


def test_bad_model_config_yaml_is_named(tmp_path):
    manifest = {"model": {"modelName": "m", "handler": "h.py", "configFile": "model-config.yaml"}}
    path = zip_archive(tmp_path / "cfg.mar", {MANIFEST_PATH: json.dumps(manifest).encode(),
                                              "model-config.yaml": b"batchSize: [unclosed"})
    with pytest.raises(OspreyError, match="model-config.yaml is not valid YAML"):
        open_archive(path, tmp_path / "work")


def test_extraction_area_removes_only_folders_whose_owner_is_gone(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from server.core.archive import ExtractionArea

    root = tmp_path / "models"
    live = ExtractionArea(root)
    (live.folder() / "osprey-a").mkdir()
    # a server killed mid-run: its folder and lock file stay, nobody holds the lock
    dead = subprocess.run([sys.executable, "-c", "import sys; from server.core.archive import ExtractionArea; "
                           f"d = ExtractionArea(sys.argv[1]).folder(); (d / 'osprey-b').mkdir(); print(d.name)",
                           str(root)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert (root / dead / "osprey-b").is_dir() and (root / f"{dead}.lock").exists()
    starting = ExtractionArea(root)
    assert starting.clean_stale() == 1
    assert not (root / dead).exists() and not (root / f"{dead}.lock").exists()
    assert (live.folder() / "osprey-a").is_dir()  # a live server's folder is kept
    assert starting.clean_stale() == 0
    live.release()  # not empty: kept for the next start, lock released
    assert ExtractionArea(root).clean_stale() == 1 and not any(root.iterdir())
