"""install_py_dep_per_model: a model archive's requirements.txt, installed for that model when it
is registered, against real ``osprey serve`` processes (tests/deps_models.py builds the archives:
a handler that imports a tiny wheel shipped in the archive and named in requirements.txt).

TorchServe 0.12's answers (tests/fixtures/torchserve_model_deps/record.py, recorded.json): with
the setting on, the model answers; a requirement pip cannot install fails the registration with
400 ``ModelException`` "Custom pip package installation failed for model broken" and the server
stays up. Osprey's message adds pip's ERROR lines (they name the requirement). With the setting
off, TorchServe answers 500 "Failed to start workers for model deps version: 1.0" (its worker
dies on the import); Osprey answers a handler that cannot load 400 naming why, as it does for
any handler (tests/e2e/test_management.py), here the ModuleNotFoundError.
"""

from __future__ import annotations

import httpx
import pytest

from tests.deps_models import PACKAGE, WHEEL, deps_archive

MISSING = "does-not-exist-0.1-py3-none-any.whl"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    deps_archive(store, "deps", f"./{WHEEL}\n")  # no isolation named: process instances
    deps_archive(store, "depst", f"./{WHEEL}\n", config={"isolation": "thread"}, answer="thread")
    deps_archive(store, "broken", f"# a wheel the archive lacks\n./{MISSING}\n")
    return store


@pytest.fixture(scope="module")
def on(osprey_module, store):
    return osprey_module([], store, config={"install_py_dep_per_model": "true"})


@pytest.fixture(scope="module")
def off(osprey_module, store):
    return osprey_module([], store)


def _register(srv, url: str) -> httpx.Response:
    return httpx.post(f"{srv.management}/models", params={"url": url, "initial_workers": 1}, timeout=120)


def test_requirements_installed_for_process_instances_and_reused(on, store):
    r = _register(on, "deps.mar")
    assert r.status_code == 200, r.text
    assert httpx.post(f"{on.inference}/predictions/deps", content=b"x").text == "from the tiny package"
    described = httpx.get(f"{on.management}/models/deps").json()[0]
    assert described["workers"][0]["pid"] != on.proc.pid  # its own process: the packages are first on its path
    folders = sorted((store / ".osprey" / "deps" / "deps" / "1.0").iterdir())
    assert len(folders) == 1 and (folders[0] / PACKAGE / "__init__.py").is_file()
    assert (folders[0] / ".complete").is_file()
    # unregistered and registered again: the installed folder is reused, pip does not run again
    assert httpx.delete(f"{on.management}/models/deps", timeout=60).status_code == 200
    assert _register(on, "deps.mar").status_code == 200
    assert httpx.post(f"{on.inference}/predictions/deps", content=b"x").text == "from the tiny package"
    assert sorted((store / ".osprey" / "deps" / "deps" / "1.0").iterdir()) == folders
    log = on.log()
    assert log.count("model deps version 1.0: installing its requirements") == 1
    assert "model deps version 1.0: its requirements are installed already" in log


def test_thread_instances_get_the_packages_with_a_warning(on):
    r = _register(on, "depst.mar")
    assert r.status_code == 200, r.text
    assert httpx.post(f"{on.inference}/predictions/depst", content=b"x").text == "thread"
    assert httpx.get(f"{on.management}/models/depst").json()[0]["workers"][0]["pid"] == on.proc.pid
    assert "model depst version 1.0 runs thread instances" in on.log()


def test_a_requirement_pip_cannot_install_fails_registration_and_the_server_stays_up(on, store):
    r = _register(on, "broken.mar")
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "ModelException"  # TorchServe's
    assert body["message"].startswith("Custom pip package installation failed for model broken (version 1.0): ERROR:")
    assert MISSING in body["message"]  # pip's ERROR line names the requirement
    assert str(store) not in body["message"]  # the server's own folders are not echoed
    assert httpx.get(f"{on.management}/models/broken").status_code == 404
    assert httpx.get(f"{on.inference}/ping").status_code == 200
    leftovers = store / ".osprey" / "deps" / "broken" / "1.0"
    assert not leftovers.exists() or not any(leftovers.iterdir())  # pip's half-filled folder is removed


def test_with_the_setting_off_requirements_are_ignored_and_the_import_fails(off, store):
    r = _register(off, "deps.mar")
    assert r.status_code == 400
    assert f"No module named '{PACKAGE}'" in r.json()["message"]
    assert httpx.get(f"{off.inference}/ping").status_code == 200
    assert "model deps version 1.0: its archive names requirements.txt, which is not installed " \
           "(install_py_dep_per_model is off)" in off.log()
