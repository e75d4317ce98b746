"""server/core/model_deps.py: when a model's installed requirements are reused, and what a pip
failure says (the install itself runs in tests/e2e/test_model_deps.py)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from server.core.errors import OspreyError
from server.core.model_deps import COMPLETE, _failure, dependency_key, install_requirements
from tests.deps_models import WHEEL, tiny_wheel


def _model(tmp_path, requirements: str, answer: str = "a"):
    tiny_wheel(tmp_path, answer)
    (tmp_path / "requirements.txt").write_text(requirements)
    return tmp_path


def test_the_key_follows_requirements_and_the_archive_files_they_name(tmp_path):
    d = _model(tmp_path, f"./{WHEEL}\n")
    key = dependency_key(d, "requirements.txt")
    assert dependency_key(d, "requirements.txt") == key  # the same archive again: reused
    tiny_wheel(d, "b")  # a new wheel under the same name: a new install
    assert dependency_key(d, "requirements.txt") != key
    tiny_wheel(d, "a")
    assert dependency_key(d, "requirements.txt") == key
    (d / "requirements.txt").write_text(f"# pinned\n./{WHEEL}\n")
    assert dependency_key(d, "requirements.txt") != key
    (d / "requirements.txt").write_text("../outside.whl\n/etc/passwd\n")  # paths outside the archive: not read
    dependency_key(d, "requirements.txt")


def test_a_complete_folder_is_reused_without_pip(tmp_path):
    d = _model(tmp_path / "m", f"./{WHEEL}\n")
    root = tmp_path / "deps"
    done = root / "m" / "1.0" / dependency_key(d, "requirements.txt")
    done.mkdir(parents=True)
    (done / COMPLETE).write_text("requirements.txt\n")
    got = asyncio.run(install_requirements("m", "1.0", d, "requirements.txt", root, timeout=0.001))
    assert got == done  # a 1 ms limit: pip cannot have run


def test_pip_errors_name_the_requirement_without_the_servers_folders(tmp_path):
    output = (f"Processing {tmp_path}/x.whl\nERROR: Could not install packages due to an OSError: [Errno 2] "
              f"No such file or directory: '{tmp_path}/x.whl'\n")
    message = _failure("m", "1.0", output, tmp_path)
    assert message == ("Custom pip package installation failed for model m (version 1.0): ERROR: Could not install "
                       "packages due to an OSError: [Errno 2] No such file or directory: './x.whl'")
    assert "pip printed nothing" in _failure("m", "1.0", "", tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX")
def test_pip_past_its_time_limit_fails_the_install_and_leaves_nothing(tmp_path):
    d = _model(tmp_path / "m", f"./{WHEEL}\n")
    root = tmp_path / "deps"
    with pytest.raises(OspreyError, match=r"pip took longer than 0.01 s \(setting py_dep_install_timeout\)") as err:
        asyncio.run(install_requirements("m", "1.0", d, "requirements.txt", root, timeout=0.01))
    assert err.value.status == 400
    assert not any((root / "m" / "1.0").iterdir())  # pip's temporary folder is gone
