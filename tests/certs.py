"""
Throw-away certificates for tests, generated with C{cryptography}: a CA,
server certificates with subject alternative names (the SRV target names and
127.0.0.1), and any number of other CAs (a "rogue" CA is just another one).

    ca = CertificateAuthority("test CA")
    rogue = CertificateAuthority("rogue CA")
    ca.write(directory)                                  # -> ca path
    cert, key = ca.issue(directory, "m1", ["m1.etcd.test"])
"""

import datetime
import ipaddress
import os
import socket
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity():
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)


def _writeKey(path, key):
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _writeCert(path, cert):
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


class CertificateAuthority:
    """
    A self-signed CA that issues server (and client) certificates.
    """

    def __init__(self, commonName="etcdgw test CA"):
        self.commonName = commonName
        self.key = ec.generate_private_key(ec.SECP256R1())
        start, end = _validity()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(commonName))
            .issuer_name(_name(commonName))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def write(self, directory, basename="ca"):
        """
        Write the CA certificate (PEM) into C{directory}; return its path.
        """
        path = os.path.join(directory, basename + ".crt")
        _writeCert(path, self.certificate)
        return path

    def issue(self, directory, basename, dnsNames=(), ips=("127.0.0.1",), client=False):
        """
        Issue a leaf certificate with the given subject alternative names and
        write C{basename}.crt / C{basename}.key into C{directory}.

        @param client: also allow client authentication (etcd's
            C{--client-cert-auth}, and etcdctl's C{--cert}).
        @return: C{(certPath, keyPath)}.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = _validity()
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if client and not dnsNames:
            usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        sans = [x509.DNSName(n) for n in dnsNames] + [
            x509.IPAddress(ipaddress.ip_address(i)) for i in ips
        ]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(dnsNames[0] if dnsNames else basename))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        certPath = os.path.join(directory, basename + ".crt")
        keyPath = os.path.join(directory, basename + ".key")
        _writeCert(certPath, cert)
        _writeKey(keyPath, key)
        return certPath, keyPath


class TLSServer:
    """
    Accepts connections on 127.0.0.1 in a thread and makes a TLS handshake on
    each with C{context} (none when C{context} is None: a silent TCP server
    that closes each connection after 2 s). Records how many connections it
    accepted and the SNI name of every handshake (the gateway's validation
    handshakes carry the SRV target name; a client forwarded by the gateway,
    such as etcdctl dialling 127.0.0.1, would carry none).
    """

    def __init__(self, context):
        self.names = []
        self.accepted = 0
        self.context = context
        if context is not None:
            context.sni_callback = lambda sock, name, ctx: self.names.append(name)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @classmethod
    def withCertificate(cls, certAndKey):
        """
        A server presenting C{(certPath, keyPath)}.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certAndKey)
        return cls(context)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.context is None:
                threading.Timer(2, conn.close).start()
                continue
            try:
                conn.settimeout(2)
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self):
        self.sock.close()
