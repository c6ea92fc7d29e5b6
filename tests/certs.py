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
