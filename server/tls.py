"""TLS for the REST listeners and the gRPC ports, from TorchServe's config.properties keys.

An address given as ``https://HOST:PORT`` (``inference_address``, ``management_address``,
``metrics_address``) is served over TLS, and ``enable_grpc_ssl=true`` puts both gRPC ports on
TLS, all with one private key and certificate chain, read from either

- ``private_key_file`` (PEM: PKCS#8 or the older OpenSSL/PKCS#1 form, unencrypted) and
  ``certificate_file`` (PEM, or DER: the server's certificate, then its chain), or
- ``keystore`` (PKCS#12) with ``keystore_pass`` (default ``changeit``) and ``keystore_type``
  (default ``PKCS12``): the first private key in it and its certificate chain. The keystore
  wins when both forms are set, as in TorchServe. A Java KeyStore (JKS, JCEKS) cannot be read
  here; the error says how to convert it.

Unlike TorchServe, which serves a throw-away self-signed certificate when https is asked for
without a key, Osprey refuses to start; so it does for a missing or broken file, a key that
does not belong to the certificate and a wrong keystore password, each message naming the
setting. :class:`Tls` holds what was loaded: :meth:`Tls.reload` (SIGHUP) reads the files again
and the next connections get the new certificate, the open ones keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

__all__ = ["TlsError", "TlsMaterial", "Tls", "tls_users", "load_material", "is_https"]

log = logging.getLogger("osprey.tls")

_JKS_MAGIC = (b"\xfe\xed\xfe\xed", b"\xce\xce\xce\xce")  # JKS, JCEKS
_CONVERT = ("convert it to PKCS#12 with `keytool -importkeystore -srckeystore {path} "
            "-destkeystore keystore.p12 -deststoretype PKCS12`, then set keystore=keystore.p12 "
            "and keystore_type=PKCS12")
_HOW = ("set private_key_file and certificate_file (PEM) or keystore (PKCS#12) with keystore_pass "
        "in config.properties (or OSPREY_PRIVATE_KEY_FILE / OSPREY_CERTIFICATE_FILE / OSPREY_KEYSTORE)")


class TlsError(ValueError):
    """TLS is asked for but cannot be set up; the message names the setting at fault."""


@dataclass(frozen=True)
class TlsMaterial:
    """One private key and its certificate chain, as PEM."""

    key_pem: bytes  # PKCS#8, unencrypted: only ever held in memory
    chain_pem: bytes  # the server's certificate first
    source: str  # which settings it came from, for the log
    subject: str
    not_after: datetime


def is_https(address: str) -> bool:
    return urlsplit(address if "://" in address else f"http://{address}").scheme.lower() == "https"


def tls_users(settings: Any) -> list[str]:
    """The settings that ask for TLS: https addresses, and enable_grpc_ssl with gRPC on."""
    users = [name for name in ("inference_address", "management_address", "metrics_address")
             if is_https(getattr(settings, name))]
    if settings.enable_grpc_ssl and settings.enable_grpc:
        users.append("enable_grpc_ssl")
    return users


def _read(setting: str, path: str) -> bytes:
    p = Path(path).expanduser()
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"setting {setting}: file {path!r} does not exist") from None
    except IsADirectoryError:
        raise TlsError(f"setting {setting}: {path!r} is a folder, not a file") from None
    except OSError as exc:
        raise TlsError(f"setting {setting}: cannot read {path!r} ({exc.strerror or exc})") from None


def _spki(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _material(key, certs: list, source: str, key_setting: str, cert_setting: str) -> TlsMaterial:
    from cryptography.hazmat.primitives import serialization

    if not certs:
        raise TlsError(f"setting {cert_setting}: no certificate found")
    mine = _spki(key.public_key())
    leaf = next((c for c in certs if _spki(c.public_key()) == mine), None)
    if leaf is None:
        raise TlsError(f"settings {key_setting} and {cert_setting}: the private key does not belong to the "
                       f"certificate ({certs[0].subject.rfc4514_string()}); give the key the certificate was made for")
    bits = getattr(key, "key_size", None)
    from cryptography.hazmat.primitives.asymmetric import dsa, rsa

    if isinstance(key, (rsa.RSAPrivateKey, dsa.DSAPrivateKey)) and bits < 2048:
        # OpenSSL's default security level refuses it at the first handshake ("ee key too small")
        raise TlsError(f"{source}: the {bits}-bit {'RSA' if isinstance(key, rsa.RSAPrivateKey) else 'DSA'} key is "
                       "too small; OpenSSL (and so Osprey) serves TLS with keys of at least 2048 bits (TorchServe's "
                       "Java accepts smaller ones): make a new key and certificate, e.g. `openssl req -x509 "
                       "-newkey rsa:2048 -nodes -keyout key.pem -out cert.pem -days 365 -subj /CN=HOST`")
    chain = [leaf] + [c for c in certs if c is not leaf]  # the server's own certificate first
    not_after = leaf.not_valid_after_utc
    if not_after < datetime.now(timezone.utc):
        log.warning("TLS certificate %s (%s) expired on %s", leaf.subject.rfc4514_string(), source,
                    not_after.isoformat())
    return TlsMaterial(
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        source=source, subject=leaf.subject.rfc4514_string(), not_after=not_after)


def _from_pem(key_path: str, cert_path: str) -> TlsMaterial:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key_data, cert_data = _read("private_key_file", key_path), _read("certificate_file", cert_path)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:  # encrypted
        raise TlsError(f"setting private_key_file: {key_path!r} is encrypted; Osprey, like TorchServe, reads an "
                       f"unencrypted key (decrypt it with `openssl pkey -in {key_path} -out key.pem`, mode 0600), "
                       "or use a PKCS#12 keystore with keystore_pass") from None
    except Exception as exc:  # ValueError, or UnsupportedAlgorithm
        raise TlsError(f"setting private_key_file: {key_path!r} is not a PEM private key (PKCS#8 "
                       f"'BEGIN PRIVATE KEY' or OpenSSL 'BEGIN RSA/EC PRIVATE KEY'): {exc}") from None
    try:
        certs = x509.load_pem_x509_certificates(cert_data) if b"-----BEGIN" in cert_data \
            else [x509.load_der_x509_certificate(cert_data)]
    except Exception as exc:
        raise TlsError(f"setting certificate_file: {cert_path!r} is not an X.509 certificate (PEM or DER): "
                       f"{exc}") from None
    return _material(key, certs, f"private_key_file={key_path}, certificate_file={cert_path}",
                     "private_key_file", "certificate_file")


def _from_keystore(path: str, password: str, kind: str) -> TlsMaterial:
    from cryptography.hazmat.primitives.serialization import pkcs12

    data = _read("keystore", path)
    kind_up = (kind or "PKCS12").strip().upper()
    if data[:4] in _JKS_MAGIC:
        what = "a Java KeyStore (JKS)" if data[:4] == _JKS_MAGIC[0] else "a Java JCEKS keystore"
        raise TlsError(f"setting keystore: {path!r} is {what} (keystore_type={kind or 'PKCS12'}), which Osprey "
                       f"cannot read; {_CONVERT.format(path=path)}")
    if kind_up in ("JKS", "JCEKS") and not data.startswith(b"\x30"):
        raise TlsError(f"setting keystore_type: {kind} keystores are not supported and {path!r} is no PKCS#12 "
                       f"file either; {_CONVERT.format(path=path)}")
    if kind_up not in ("PKCS12", "P12", "PFX", "JKS", "JCEKS"):  # JKS/JCEKS naming a PKCS#12 file: read, as Java does
        raise TlsError(f"setting keystore_type: {kind!r} is not supported; Osprey reads PKCS12 keystores "
                       "(or use private_key_file and certificate_file)")
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password.encode() if password else None)
    except ValueError as exc:
        if not data.startswith(b"\x30"):
            raise TlsError(f"setting keystore: {path!r} is not a PKCS#12 keystore ({exc})") from None
        raise TlsError(f"setting keystore_pass: wrong password for keystore {path!r} (or the file is damaged: "
                       f"{exc})") from None
    except Exception as exc:  # an algorithm this OpenSSL lacks, ...
        raise TlsError(f"setting keystore: cannot read {path!r}: {exc}") from None
    if key is None:
        raise TlsError(f"setting keystore: {path!r} holds no private key entry")
    if cert is None:
        raise TlsError(f"setting keystore: {path!r} holds a private key but no certificate for it")
    return _material(key, [cert, *extra], f"keystore={path}", "keystore", "keystore")


def load_material(settings: Any) -> TlsMaterial | None:
    """The key and chain the settings name, or None when nothing asks for TLS.

    Raises :class:`TlsError` naming the setting when TLS is asked for and cannot be had.
    """
    users = tls_users(settings)
    if not users:
        given = [n for n in ("private_key_file", "certificate_file", "keystore") if getattr(settings, n)]
        if given:
            log.info("%s set, but no address is https:// and enable_grpc_ssl is off: serving without TLS",
                     ", ".join(given))
        return None
    if settings.keystore:
        if settings.private_key_file or settings.certificate_file:
            log.info("keystore and private_key_file/certificate_file both set: the keystore is used (as TorchServe)")
        return _from_keystore(settings.keystore, settings.keystore_pass, settings.keystore_type)
    if settings.private_key_file and settings.certificate_file:
        return _from_pem(settings.private_key_file, settings.certificate_file)
    asking = ", ".join(f"{u}={getattr(settings, u)}" for u in users)
    if settings.private_key_file or settings.certificate_file:
        missing = "certificate_file" if settings.private_key_file else "private_key_file"
        raise TlsError(f"setting {missing} is missing: {asking} needs TLS, and private_key_file and "
                       "certificate_file go together (or set keystore)")
    raise TlsError(f"{asking} needs a TLS key and certificate, and none is set: {_HOW}")


def _load_into(ctx: ssl.SSLContext, material: TlsMaterial) -> None:
    """Put the key and chain into an SSLContext (the ssl module reads only files: the key goes
    through a private temporary file, encrypted with a one-time password)."""
    from cryptography.hazmat.primitives import serialization

    password = os.urandom(24).hex().encode()
    key = serialization.load_pem_private_key(material.key_pem, password=None)
    sealed = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(password))
    with tempfile.TemporaryDirectory(prefix="osprey-tls-") as folder:
        path = os.path.join(folder, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(material.chain_pem + sealed)
        try:
            ctx.load_cert_chain(path, password=password)
        except ssl.SSLError as exc:
            raise TlsError(f"{material.source}: OpenSSL refuses this key or certificate: {exc.reason or exc}"
                           f"{_WHY.get(exc.reason, '')}") from None


# what OpenSSL's refusals mean at its default security level (TorchServe's Java TLS accepts them)
_WHY = {
    "EE_KEY_TOO_SMALL": " (an RSA or DSA key under 2048 bits, or an EC key under 224 bits; "
                        "make a larger key, e.g. `openssl req -x509 -newkey rsa:2048 ...`)",
    "CA_MD_TOO_SMALL": " (the certificate is signed with MD5 or SHA-1; sign it with SHA-256)",
}


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    _load_into(ctx, material)
    return ctx


class Tls:
    """The TLS material of one server: one SSLContext for its https listeners, gRPC credentials
    for its gRPC ports, and :meth:`reload`, after which new connections get the files' new key
    and certificate (open connections keep the one they shook hands with)."""

    def __init__(self, settings: Any, material: TlsMaterial):
        self.settings = settings
        self.material = material
        self.generation = 0
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> "Tls | None":
        material = load_material(settings)
        if material is None:
            return None
        tls = cls(settings, material)
        log.info("TLS: %s (certificate %s, valid until %s) for %s", material.source, material.subject,
                 material.not_after.date().isoformat(), ", ".join(tls_users(settings)))
        return tls

    def context(self) -> ssl.SSLContext:
        """The one SSLContext every https listener of this server shares."""
        if self._context is None:
            self._context = server_context(self.material)
        return self._context

    def reload(self) -> bool:
        """Read the key and certificate again; on any error keep serving the old ones (logged)."""
        try:
            material = load_material(self.settings)
            if material is None:
                return False
            if self._context is not None:
                # a context's certificate and key are replaced in place: connections accepted from
                # now on get the new ones (a broken pair was refused by load_material first)
                _load_into(self._context, material)
        except (TlsError, ssl.SSLError, OSError) as exc:
            log.error("TLS reload failed, still serving %s (%s): %s", self.material.subject, self.material.source, exc)
            return False
        with self._lock:
            self.material = material
            self.generation += 1
        log.info("TLS reloaded: %s (certificate %s, valid until %s)", material.source, material.subject,
                 material.not_after.date().isoformat())
        return True

    def grpc_credentials(self):
        """Server credentials for one gRPC port; each new connection picks up a reload."""
        import grpc

        def config(material: TlsMaterial):
            return grpc.ssl_server_certificate_configuration([(material.key_pem, material.chain_pem)])

        seen = [self.generation]

        def fetch() -> Any:  # called by gRPC before each new connection's handshake
            if self.generation == seen[0]:
                return None
            with self._lock:
                seen[0], material = self.generation, self.material
            return config(material)

        return grpc.dynamic_ssl_server_credentials(config(self.material), fetch)

