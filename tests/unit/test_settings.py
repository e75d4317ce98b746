"""Settings: TorchServe's config.properties, the environment, and the command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.core.model_config import parse_model_config
from server.core.errors import OspreyError
from server.settings import load_settings, parse_address, parse_properties
from server.tls import tls_users


def test_torchserve_config_properties_are_read(tmp_path):
    props = tmp_path / "config.properties"
    props.write_text(
        "# a TorchServe config\n"
        "inference_address=http://127.0.0.1:9080\n"
        "management_address=http://127.0.0.1:9081\n"
        "metrics_address=http://127.0.0.1:9082\n"
        "model_store=/models\n"
        "load_models=a.mar,b.mar\n"
        "job_queue_size=7\n"
        "default_response_timeout=30\n"
        "max_request_size=1000\n"
        "disable_token_authorization=true\n"
        "enable_model_api=true\n"
        "number_of_netty_threads=4\n")
    s = load_settings(props, env={})
    assert s.inference_address.endswith(":9080") and s.management_address.endswith(":9081")
    assert s.model_store == "/models" and s.load_models == ("a.mar", "b.mar")
    assert s.job_queue_size == 7 and s.default_response_timeout == 30.0 and s.max_request_size == 1000
    assert s.disable_token_authorization and s.enable_model_api


def test_precedence_cli_over_env_over_file(tmp_path):
    props = tmp_path / "c.properties"
    props.write_text("job_queue_size=5\nmax_request_size=10\nenable_envvars_config=true\n")
    s = load_settings(props, env={"OSPREY_JOB_QUEUE_SIZE": "6", "TS_MAX_REQUEST_SIZE": "20"},
                      overrides={"job_queue_size": 9})
    assert s.job_queue_size == 9 and s.max_request_size == 20


def test_bad_values_are_named(tmp_path):
    props = tmp_path / "c.properties"
    props.write_text("job_queue_size=lots\n")
    with pytest.raises(ValueError, match="job_queue_size"):
        load_settings(props, env={})
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(tmp_path / "missing.properties", env={})
    props.write_text("max_response_size=0\n")  # no answer could go out: refused at start, named
    with pytest.raises(ValueError, match="setting max_response_size: 0 must be a positive number of bytes"):
        load_settings(props, env={})


def test_unregister_timeout_from_properties_and_environment(tmp_path):
    props = tmp_path / "c.properties"
    props.write_text("unregister_timeout=5\n")
    assert load_settings(env={}).unregister_timeout == 30.0
    assert load_settings(props, env={}).unregister_timeout == 5.0
    assert load_settings(props, env={"OSPREY_UNREGISTER_TIMEOUT": "0"}).unregister_timeout == 0.0
    with pytest.raises(ValueError, match="unregister_timeout"):
        load_settings(env={"OSPREY_UNREGISTER_TIMEOUT": "-1"})


def test_tls_keys_and_https_addresses(tmp_path):
    """TorchServe's TLS keys are settings of their own; https:// addresses and enable_grpc_ssl ask for TLS."""
    props = tmp_path / "c.properties"
    props.write_text("inference_address=https://127.0.0.1:8443\nmanagement_address=https://127.0.0.1\n"
                     "keystore=ks.p12\nkeystore_type=PKCS12\nenable_grpc_ssl=true\n")
    s = load_settings(props, env={"OSPREY_KEYSTORE_PASS": "pw"})
    assert (s.keystore, s.keystore_pass, s.keystore_type, s.enable_grpc_ssl) == ("ks.p12", "pw", "PKCS12", True)
    assert load_settings(env={}).keystore_pass == "changeit"  # TorchServe's default
    assert tls_users(s) == ["inference_address", "management_address", "enable_grpc_ssl"]
    assert tls_users(s.replace(enable_grpc=False)) == ["inference_address", "management_address"]
    assert tls_users(load_settings(env={})) == []
    assert parse_address("https://127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_address("https://127.0.0.1") == ("127.0.0.1", 443)  # TorchServe's default https port
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        parse_address("http://127.0.0.1")
    with pytest.raises(ValueError, match="https://HOST:PORT"):
        parse_address("ftp://127.0.0.1:21")


def test_properties_continuation_and_colons():
    assert parse_properties("a: 1\nb=x\\\n  y\n!c\n") == {"a": "1", "b": "xy"}


def test_model_config_merges_overrides_and_names_bad_keys():
    cfg = parse_model_config({"batchSize": 8, "maxBatchDelay": 5, "minWorkers": 2, "maxWorkers": 3},
                             overrides={"batchSize": 16})
    assert cfg.batch_size == 16 and cfg.max_batch_delay_ms == 5 and cfg.min_workers == 2
    with pytest.raises(OspreyError, match="batchSize"):
        parse_model_config({"batchSize": "many"})
    with pytest.raises(OspreyError, match="maxWorkers"):
        parse_model_config({"minWorkers": 3, "maxWorkers": 1})
    with pytest.raises(OspreyError, match="datatype"):
        parse_model_config({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [-1, 3]}]})


def test_ts_environment_wins_over_the_command_line_as_in_torchserve(tmp_path):
    """TorchServe applies TS_ variables (with enable_envvars_config=true) after its flags."""
    props = tmp_path / "c.properties"
    props.write_text("enable_envvars_config=true\ndisable_token_authorization=false\n")
    flag = {"disable_token_authorization": True}  # --disable-token-auth
    assert not load_settings(props, env={"TS_DISABLE_TOKEN_AUTHORIZATION": "false"},
                             overrides=flag).disable_token_authorization
    assert load_settings(props, env={"TS_DISABLE_TOKEN_AUTHORIZATION": "true"}).disable_token_authorization
    assert load_settings(props, env={}, overrides=flag).disable_token_authorization
    # without enable_envvars_config TS_ variables are not read; OSPREY_ ones stay below the flags
    props.write_text("disable_token_authorization=false\n")
    assert load_settings(props, env={"TS_DISABLE_TOKEN_AUTHORIZATION": "false"},
                         overrides=flag).disable_token_authorization
    assert load_settings(props, env={"OSPREY_DISABLE_TOKEN_AUTHORIZATION": "false"},
                         overrides=flag).disable_token_authorization


def test_token_expiration_min(tmp_path):
    props = tmp_path / "c.properties"
    props.write_text("token_expiration_min=0.25\n")
    assert load_settings(props, env={}).token_expiration_min == 0.25
    assert load_settings(None, env={}).token_expiration_min == 0.0


def test_supplied_keys_advertised_host_and_state_dir(tmp_path):
    keys = {"OSPREY_INFERENCE_KEY": "infer-key-1", "OSPREY_MANAGEMENT_KEY": "mgmt-key-1", "OSPREY_API_KEY": "api-key-01"}
    s = load_settings(env={**keys, "OSPREY_ADVERTISED_HOST": "10.1.2.3", "OSPREY_STATE_DIR": "/var/lib/osprey/state"})
    assert (s.inference_key, s.management_key, s.api_key) == ("infer-key-1", "mgmt-key-1", "api-key-01")
    assert s.advertised_host == "10.1.2.3" and s.state_dir == "/var/lib/osprey/state"
    assert "infer-key-1" not in repr(s)  # secrets stay out of logs and tracebacks
    props = tmp_path / "config.properties"
    props.write_text("advertised_host=osprey-0.osprey.ml.svc\nstate_dir=/data/state\n")
    assert load_settings(props, env={}).advertised_host == "osprey-0.osprey.ml.svc"
    with pytest.raises(ValueError, match="go together.*api_key missing"):
        load_settings(env={k: v for k, v in keys.items() if k != "OSPREY_API_KEY"})
    with pytest.raises(ValueError, match="setting management_key: a key must be at least 8") as err:
        load_settings(env={**keys, "OSPREY_MANAGEMENT_KEY": "short"})
    assert "short" not in str(err.value)  # a secret is never quoted
    with pytest.raises(ValueError, match="without spaces"):
        load_settings(env={**keys, "OSPREY_MANAGEMENT_KEY": "has a space"})
    with pytest.raises(ValueError, match="must differ"):
        load_settings(env={**keys, "OSPREY_API_KEY": "infer-key-1"})
    # the Kubernetes Secret's published placeholders are refused, named, never quoted
    secret = (Path(__file__).parents[2] / "deploy/kubernetes/base/secret.yaml").read_text()
    placeholder = re.search(r"inference-key: (\S+)", secret).group(1)
    with pytest.raises(ValueError, match="setting inference_key: still the placeholder") as err:
        load_settings(env={**keys, "OSPREY_INFERENCE_KEY": placeholder})
    assert placeholder not in str(err.value)
    for bad in ("http://10.1.2.3", "10.1.2.3:8081", "0.0.0.0", "::", "a b"):
        with pytest.raises(ValueError, match="setting advertised_host"):
            load_settings(env={"OSPREY_ADVERTISED_HOST": bad})
    assert load_settings(env={"OSPREY_ADVERTISED_HOST": "fd00::5"}).advertised_host == "fd00::5"


def test_job_urls_use_the_advertised_host():
    from server.state import job_url

    assert job_url("http://0.0.0.0:8081") == "http://127.0.0.1:8081"  # no setting: this machine only
    assert job_url("http://0.0.0.0:8081", "10.1.2.3") == "http://10.1.2.3:8081"
    assert job_url("https://127.0.0.1:8443", "osprey-0.ml") == "https://osprey-0.ml:8443"
    assert job_url("http://[::]:8080", "fd00::5") == "http://[fd00::5]:8080"
    assert job_url("http://10.9.9.9:8080") == "http://10.9.9.9:8080"


def test_state_dir_is_the_stores_unless_it_is_read_only(tmp_path, caplog):
    from server.settings import Settings
    from server.state import resolve_state_dir

    store, work = tmp_path / "store", tmp_path / "work"
    store.mkdir()
    s = resolve_state_dir(Settings(model_store=str(store), workdir=str(work)))
    assert s.state_dir == str(store / ".osprey") and (store / ".osprey").is_dir()
    given = resolve_state_dir(Settings(model_store=str(store), state_dir=str(tmp_path / "elsewhere")))
    assert given.state_dir == str(tmp_path / "elsewhere")
    # a store where .osprey cannot be made (a file of that name stands in for a read-only store here;
    # tests/e2e/test_read_only_store.py serves from a real read-only mount)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / ".osprey").write_text("")
    s = resolve_state_dir(Settings(model_store=str(blocked), workdir=str(work)))
    assert s.state_dir == str(work / ".osprey")
    assert [r.message for r in caplog.records if "is not writable" in r.message] != []


def test_defaults_give_way_to_config_environment_and_flags(tmp_path):
    """`osprey torchserve` starts the server with TorchServe's defaults (TORCHSERVE_DEFAULTS):
    they replace Osprey's own, never a value config.properties, the environment or a flag set."""
    from server.torchserve_cli import TORCHSERVE_DEFAULTS

    s = load_settings(None, env={}, defaults=TORCHSERVE_DEFAULTS)
    assert (s.log_location, s.metrics_mode, s.token_auth_status, s.token_expiration_min) == ("logs", "log", 400, 60.0)
    cfg = tmp_path / "config.properties"
    cfg.write_text("token_expiration_min=0.25\nmetrics_mode=prometheus\n")
    s = load_settings(cfg, env={"LOG_LOCATION": "/var/log/ts", "OSPREY_TOKEN_AUTH_STATUS": "401"},
                      defaults=TORCHSERVE_DEFAULTS)
    assert (s.log_location, s.metrics_mode, s.token_auth_status, s.token_expiration_min) == (
        "/var/log/ts", "prometheus", 401, 0.25)
    assert load_settings(None, env={}).token_auth_status == 401  # `osprey serve` keeps Osprey's
    # TorchServe's worker lines and 500 "Worker died." (server/core/worker_lines.py), no hang grace,
    # handler output on the console; `osprey serve` keeps its event= lines and 504
    s = load_settings(None, env={}, defaults=TORCHSERVE_DEFAULTS)
    assert (s.worker_lifecycle, s.hang_grace, s.model_log_console) == ("torchserve", 0.0, True)
    s = load_settings(None, env={})
    assert (s.worker_lifecycle, s.hang_grace, s.model_log_console) == ("osprey", 1.0, False)
    with pytest.raises(ValueError, match="setting worker_lifecycle: 'java' must be osprey or torchserve"):
        load_settings(None, env={"OSPREY_WORKER_LIFECYCLE": "java"})


def test_omp_wait_policy_defaults_to_passive_and_refuses_unknown_values():
    assert load_settings(env={}).omp_wait_policy == "passive"
    assert load_settings(env={"OSPREY_OMP_WAIT_POLICY": ""}).omp_wait_policy == ""  # torch's default
    with pytest.raises(ValueError, match="omp_wait_policy: 'spin' must be passive, active or empty"):
        load_settings(env={"OSPREY_OMP_WAIT_POLICY": "spin"})


def test_omp_wait_policy_is_exported_unless_the_environment_has_one():
    from server.serve import apply_omp_wait_policy

    env: dict[str, str] = {}
    assert apply_omp_wait_policy("passive", env, modules={}) is True and env == {"OMP_WAIT_POLICY": "PASSIVE"}  # no spin
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert apply_omp_wait_policy("passive", mine, modules={}) is False and mine == {"OMP_WAIT_POLICY": "ACTIVE"}
    empty: dict[str, str] = {}
    assert apply_omp_wait_policy("", empty, modules={}) is False and empty == {}
    late: dict[str, str] = {}  # torch already loaded its OpenMP runtime: setting it now would be a lie
    assert apply_omp_wait_policy("passive", late, modules={"torch": object()}) is False and late == {}


def test_omp_spin_count_defaults_to_a_short_spin_and_goes_with_the_passive_policy_only():
    from server.serve import apply_omp_wait_policy

    assert load_settings(env={}).omp_spin_count == 1000
    assert load_settings(env={"OSPREY_OMP_SPIN_COUNT": "0"}).omp_spin_count == 0
    with pytest.raises(ValueError, match="omp_spin_count: -5 must be 0"):
        load_settings(env={"OSPREY_OMP_SPIN_COUNT": "-5"})
    # (as ACTIVE with the count: libgomp's throttled spin, more threads than CPUs, is 0 under PASSIVE)
    env: dict[str, str] = {}
    assert apply_omp_wait_policy("passive", env, modules={}, spin_count=1000)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
    at_once: dict[str, str] = {}  # 0: sleep at once, libgomp's passive default
    assert apply_omp_wait_policy("passive", at_once, modules={}, spin_count=0) and at_once == {"OMP_WAIT_POLICY": "PASSIVE"}
    active: dict[str, str] = {}  # active spins without end: a count would cut it short
    assert apply_omp_wait_policy("active", active, modules={}, spin_count=1000) and active == {"OMP_WAIT_POLICY": "ACTIVE"}
    mine = {"GOMP_SPINCOUNT": "50"}  # the user's own count wins
    assert apply_omp_wait_policy("passive", mine, modules={}, spin_count=1000)
    assert mine == {"GOMP_SPINCOUNT": "50", "OMP_WAIT_POLICY": "PASSIVE"}


def test_numpy_blas_threads_defaults_to_one_and_refuses_negative_counts():
    assert load_settings(env={}).numpy_blas_threads == 1
    assert load_settings(env={"OSPREY_NUMPY_BLAS_THREADS": "0"}).numpy_blas_threads == 0  # numpy's default
    with pytest.raises(ValueError, match="numpy_blas_threads: -2 must be 0"):
        load_settings(env={"OSPREY_NUMPY_BLAS_THREADS": "-2"})


def test_numpy_blas_threads_limits_numpy_own_blas_unless_the_environment_sets_a_count():
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    from server.serve import apply_numpy_blas_threads

    def numpy_blas():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]

    np.ones((2, 2)) @ np.ones((2, 2))  # numpy's BLAS is loaded
    with threadpool_limits(limits=None):  # whatever this test sets is undone after it
        assert apply_numpy_blas_threads(0, environ={}) == 0  # 0: numpy keeps its own
        assert apply_numpy_blas_threads(1, environ={"OPENBLAS_NUM_THREADS": "4"}) == 0  # the user's count wins
        assert apply_numpy_blas_threads(1, environ={"OMP_NUM_THREADS": "4"}) == 0
        if numpy_blas():  # a numpy built against a system BLAS outside its package is left alone
            assert apply_numpy_blas_threads(1, environ={}) == len(numpy_blas())
            assert set(numpy_blas()) == {1}


def test_max_header_size_defaults_to_64_kib_and_refuses_a_tiny_limit():
    assert load_settings(env={}).max_header_size == 65536
    assert load_settings(env={"OSPREY_MAX_HEADER_SIZE": "8192"}).max_header_size == 8192
    with pytest.raises(ValueError, match="max_header_size: 100 must be at least 1024 bytes"):
        load_settings(env={"OSPREY_MAX_HEADER_SIZE": "100"})
