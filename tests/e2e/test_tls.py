"""TLS as TorchServe configures it: https on the inference, management and metrics listeners
from ``private_key_file`` + ``certificate_file`` or a PKCS#12 ``keystore``, ``enable_grpc_ssl``
for both gRPC ports, certificate reload on SIGHUP, and every broken configuration refused at
start naming its setting. Certificates are made here with ``cryptography`` (a private CA and a
server certificate for 127.0.0.1), nothing is fetched."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from google.protobuf import empty_pb2

# the OIP stubs from tritonclient, as the other tests: importing the server's own generated copy
# of grpc_service.proto too would register the same proto file twice in this process
from tritonclient.grpc import service_pb2 as grpc_service_pb2, service_pb2_grpc as grpc_service_pb2_grpc
from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc
from server.protocols.grpc.generated import management_pb2, management_pb2_grpc
from tests.conftest import ROOT, free_port
from tests.oip_archives import echo_archive


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(folder: Path, label: str = "ca") -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it: ca.pem, cert.pem,
    key.pem (an RSA key in the old OpenSSL 'BEGIN RSA PRIVATE KEY' form, as TorchServe's own
    test key), keystore.p12 (password s3cret)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"Osprey test {label}")).issuer_name(_name(f"Osprey test {label}"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {n: folder / f for n, f in (("ca", "ca.pem"), ("cert", "cert.pem"), ("key", "key.pem"),
                                        ("p12", "keystore.p12"))}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    paths["p12"].write_bytes(pkcs12.serialize_key_and_certificates(
        b"osprey", key, cert, [ca], serialization.BestAvailableEncryption(b"s3cret")))
    return paths


def _client(ca: Path, **kw) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10, **kw)


def _grpc_creds(ca: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("store")
    echo_archive(store)
    return store


@pytest.fixture(scope="module")
def server(osprey_module, pki, tls_store):
    """All three REST listeners on https and both gRPC ports on TLS, from PEM files."""
    return osprey_module(["echo=echo.mar"], tls_store, scheme="https",
                         config={"private_key_file": pki["key"], "certificate_file": pki["cert"],
                                 "enable_grpc_ssl": "true"})


def test_https_on_inference_management_and_metrics(server, pki):
    assert server.inference.startswith("https://")
    with _client(pki["ca"]) as c:
        r = c.get(f"{server.inference}/ping")
        assert r.status_code == 200 and r.json() == {"status": "Healthy"}
        r = c.post(f"{server.inference}/predictions/echo", content=b"over tls")
        assert r.status_code == 200 and r.content == b"OVER TLS"
        big = b"x" * 1_000_000  # an answer past the join limit goes out as several writes over TLS
        r = c.post(f"{server.inference}/predictions/echo", content=big)
        assert r.status_code == 200 and r.content == big.upper()
        r = c.get(f"{server.management}/models")
        assert r.status_code == 200 and [m["modelName"] for m in r.json()["models"]] == ["echo"]
        r = c.get(f"{server.metrics}/metrics")
        assert r.status_code == 200 and b"ts_inference_requests_total" in r.content
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # an unknown CA is not trusted
        httpx.get(f"{server.inference}/ping", timeout=5)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_the_ca_as_in_the_readme(server, pki):
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(pki["ca"]), f"{server.inference}/ping"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert '"Healthy"' in out.stdout


def test_plain_http_to_an_https_port_fails_cleanly_and_the_server_stays_up(server, pki):
    plain = server.inference.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/ping", timeout=5)
    # a raw client: the connection ends (a TLS alert at most), nothing hangs
    with socket.create_connection(("127.0.0.1", server.ports["management"]), timeout=5) as sock:
        sock.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
        assert b"HTTP/1.1" not in got
    with _client(pki["ca"]) as c:
        assert c.get(f"{server.inference}/ping").status_code == 200
        assert c.get(f"{server.management}/models").status_code == 200
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()


def test_grpc_over_tls_inference_and_management(server, pki):
    with grpc.secure_channel(server.grpc, _grpc_creds(pki["ca"])) as ch:
        ts = inference_pb2_grpc.InferenceAPIsServiceStub(ch)
        assert "Healthy" in ts.Ping(empty_pb2.Empty(), timeout=10).health
        answer = ts.Predictions(inference_pb2.PredictionsRequest(model_name="echo", input={"body": b"grpc"}),
                                timeout=10)
        assert answer.prediction == b"GRPC"
        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert oip.ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=10).live
    with grpc.secure_channel(server.grpc_management, _grpc_creds(pki["ca"])) as ch:
        listed = management_pb2_grpc.ManagementAPIsServiceStub(ch).ListModels(
            management_pb2.ListModelsRequest(), timeout=10)
        assert "echo" in listed.msg
    with grpc.insecure_channel(server.grpc) as ch:  # plaintext to a TLS port: no answer, server unharmed
        with pytest.raises(grpc.RpcError) as err:
            grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(grpc_service_pb2.ServerLiveRequest(),
                                                                           timeout=3)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert server.proc.poll() is None


def test_pkcs12_keystore(osprey, pki, tls_store):
    """A keystore (TorchServe's option 1) serves https and gRPC over TLS."""
    srv = osprey(["echo=echo.mar"], tls_store, scheme="https",
                 config={"keystore": pki["p12"], "keystore_pass": "s3cret", "keystore_type": "PKCS12",
                         "enable_grpc_ssl": "true"})
    with _client(pki["ca"]) as c:
        assert c.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}
        assert c.post(f"{srv.inference}/predictions/echo", content=b"p12").content == b"P12"
    with grpc.secure_channel(srv.grpc, _grpc_creds(pki["ca"])) as ch:
        assert grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(
            grpc_service_pb2.ServerLiveRequest(), timeout=10).live
    assert "keystore=" in srv.log()


def _bad_configs(pki: dict[str, Path], folder: Path) -> dict[str, tuple[dict, list[str]]]:
    broken = folder / "broken.pem"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    jks = folder / "keystore.jks"
    jks.write_bytes(b"\xfe\xed\xfe\xed\x00\x00\x00\x02" + b"\x00" * 64)  # a Java KeyStore's header
    other = make_pki(folder / "other", "other")
    return {
        "https without a key": ({}, ["inference_address=https://", "private_key_file", "certificate_file", "keystore"]),
        "missing certificate file": ({"private_key_file": pki["key"], "certificate_file": folder / "nope.pem"},
                                     ["certificate_file", "does not exist"]),
        "key without certificate": ({"private_key_file": pki["key"]}, ["certificate_file is missing"]),
        "broken key": ({"private_key_file": broken, "certificate_file": pki["cert"]},
                       ["private_key_file", "not a PEM private key"]),
        "key of another certificate": ({"private_key_file": other["key"], "certificate_file": pki["cert"]},
                                       ["private_key_file and certificate_file", "does not belong"]),
        "wrong keystore password": ({"keystore": pki["p12"], "keystore_pass": "wrong"},
                                    ["keystore_pass", "wrong password"]),
        "missing keystore": ({"keystore": folder / "nope.p12"}, ["setting keystore", "does not exist"]),
        "JKS keystore": ({"keystore": jks, "keystore_type": "JKS", "keystore_pass": "changeit"},
                         ["setting keystore", "JKS", "keytool -importkeystore", "-deststoretype PKCS12"]),
        "unknown keystore type": ({"keystore": pki["p12"], "keystore_type": "BKS"}, ["keystore_type", "BKS"]),
        "gRPC TLS without a key": ({"enable_grpc_ssl": "true", "inference_address": None},
                                   ["enable_grpc_ssl=True", "private_key_file"]),
    }


def test_every_broken_configuration_is_refused_at_start_naming_the_setting(pki, tmp_path):
    """Each refused in the foreground before anything listens: exit 2, one line naming the setting."""
    cases = _bad_configs(pki, tmp_path)
    port = free_port()
    for case, (config, expected) in cases.items():
        props = {"inference_address": f"https://127.0.0.1:{port}", "model_store": tmp_path,
                 "disable_token_authorization": "true", **config}
        text = "".join(f"{k}={v}\n" for k, v in props.items() if v is not None)
        (tmp_path / "config.properties").write_text(text)
        out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--foreground", "--ts-config",
                              str(tmp_path / "config.properties"), "--pid-file", str(tmp_path / "p.pid"),
                              "--metrics-address", f"http://127.0.0.1:{free_port()}",
                              "--management-address", f"http://127.0.0.1:{free_port()}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 2, (case, out.stdout, out.stderr)
        for word in expected:
            assert word in out.stderr, (case, word, out.stderr)
        assert "Traceback" not in out.stderr, (case, out.stderr)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_sighup_reloads_the_certificate_for_new_connections(server, pki, tmp_path):
    """Replace the files, send SIGHUP: new https and gRPC connections get the new certificate
    (signed by another CA), and a broken replacement keeps the old one serving. Last: it
    changes the module's server."""
    new = make_pki(tmp_path / "new", "renewed")
    with _client(pki["ca"]) as old_client:  # a connection open before the reload keeps working
        assert old_client.get(f"{server.inference}/ping").status_code == 200
        shutil.copy(new["key"], pki["key"])
        shutil.copy(new["cert"], pki["cert"])
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "TLS reloaded" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert old_client.get(f"{server.inference}/ping").status_code == 200
    with _client(new["ca"]) as c:
        assert c.get(f"{server.management}/models").status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        with _client(pki["ca"]) as c:
            c.get(f"{server.inference}/ping")
    with grpc.secure_channel(server.grpc, _grpc_creds(new["ca"])) as ch:
        assert grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerLive(
            grpc_service_pb2.ServerLiveRequest(), timeout=10).live
    # a broken file: the reload is refused (logged) and the renewed certificate keeps serving
    pki["key"].write_text("garbage")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS reload failed" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert "private_key_file" in server.log().split("TLS reload failed", 1)[1].splitlines()[0]
    with _client(new["ca"]) as c:
        assert c.get(f"{server.inference}/ping").status_code == 200
    assert server.proc.poll() is None


def test_a_key_openssl_refuses_as_too_small_is_named_before_the_server_starts(tmp_path):
    """TorchServe's own test key is 1024-bit RSA: Java serves it, OpenSSL refuses it at the first
    handshake. Osprey says so at start, naming the files and how to make a key it can serve."""
    from server.settings import load_settings
    from server.tls import TlsError, load_material

    now = datetime.datetime.now(datetime.timezone.utc)
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert = (x509.CertificateBuilder().subject_name(_name("old")).issuer_name(_name("old"))
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    settings = load_settings(None, env={}, overrides={
        "inference_address": "https://127.0.0.1:8443", "private_key_file": str(tmp_path / "key.pem"),
        "certificate_file": str(tmp_path / "cert.pem")})
    with pytest.raises(TlsError, match=r"key\.pem.*the 1024-bit RSA key is too small.*at least 2048 bits"):
        load_material(settings)
