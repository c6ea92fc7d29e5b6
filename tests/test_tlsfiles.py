import os
import tempfile

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.tlsfiles import (
    MAX_BYTES,
    TLSFileError,
    checkKeyPair,
    loadCertificates,
    readCertificates,
    readKeyPair,
    readPEMFile,
)
from tests.certs import CertificateAuthority


def encryptedKey(keyPath, path):
    """
    Write the key in C{keyPath} to C{path}, encrypted with a passphrase.
    """
    with open(keyPath, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    return path


class TLSFilesTestCase(SynchronousTestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(self._cleanUp)

    def _cleanUp(self):
        for name in os.listdir(self.directory):
            os.remove(os.path.join(self.directory, name))
        os.rmdir(self.directory)

    def write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    def assertOneLine(self, error, *parts):
        message = str(error)
        self.assertNotIn("\n", message)
        for part in parts:
            self.assertIn(part, message)


class ReadPEMFileTests(TLSFilesTestCase):
    def test_regularFile(self):
        """A regular file is read whole."""
        path = self.write("a.pem", b"x" * 5000)
        self.assertEqual(readPEMFile(path, "--trusted-ca-file"), b"x" * 5000)

    def test_specialFilesRefused(self):
        """
        Devices, FIFOs and directories are refused without being read: no
        hang on /dev/zero or a FIFO with no writer.
        """
        fifo = os.path.join(self.directory, "fifo")
        os.mkfifo(fifo)
        for path, kind in [
            ("/dev/zero", "a character device"),
            ("/dev/null", "a character device"),
            (fifo, "a FIFO"),
            (self.directory, "a directory"),
        ]:
            e = self.assertRaises(TLSFileError, readPEMFile, path, "--trusted-ca-file")
            self.assertOneLine(
                e, f'--trusted-ca-file: cannot read "{path}"', f"not a regular file ({kind})"
            )

    def test_sizeBounded(self):
        """A file over the limit (1 MiB) is refused; one at the limit is read."""
        self.assertEqual(len(readPEMFile(self.write("max", b"x" * MAX_BYTES), "--f")), MAX_BYTES)
        path = self.write("big", b"x" * (MAX_BYTES + 1))
        e = self.assertRaises(TLSFileError, readPEMFile, path, "--health-cert-file")
        self.assertOneLine(e, "--health-cert-file", path, "larger than 1 MiB")

    def test_unreadable(self):
        """A missing file, or a name holding a NUL byte, is one line naming it."""
        e = self.assertRaises(TLSFileError, readPEMFile, "/nonexistent/x.pem", "--f")
        self.assertOneLine(e, '--f: cannot read "/nonexistent/x.pem": No such file')
        e = self.assertRaises(TLSFileError, readPEMFile, "a\0b", "--f")
        self.assertOneLine(e, "--f: cannot read", "NUL byte")

    def test_certificates(self):
        """loadCertificates returns every certificate; garbage is refused."""
        ca, other = CertificateAuthority("one"), CertificateAuthority("two")
        bundle = self.write(
            "bundle.pem",
            self.read(ca.write(self.directory, "one")) + self.read(other.write(self.directory, "two")),
        )
        self.assertEqual(len(loadCertificates(bundle, "--trusted-ca-file")), 2)
        for data in [b"", b"not a certificate\n",
                     b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]:
            path = self.write("bad.pem", data)
            e = self.assertRaises(TLSFileError, loadCertificates, path, "--trusted-ca-file")
            self.assertOneLine(e, f'--trusted-ca-file: "{path}" holds no PEM certificate')


class CheckKeyPairTests(TLSFilesTestCase):
    def setUp(self):
        super().setUp()
        self.ca = CertificateAuthority()
        self.cert, self.key = self.ca.issue(self.directory, "client", client=True)

    def check(self, cert, key):
        return checkKeyPair(cert, key, "--health-cert-file", "--health-key-file")

    def test_pair(self):
        """A certificate and its key are accepted; the key's path is returned."""
        self.assertEqual(self.check(self.cert, self.key), self.key)

    def test_keyInCertificateFile(self):
        """
        Without a key file, the key is read from the certificate file, and
        that file's path is returned as the key's.
        """
        both = self.write("both.pem", self.read(self.cert) + self.read(self.key))
        self.assertEqual(self.check(both, None), both)
        keyFirst = self.write("keyfirst.pem", self.read(self.key) + self.read(self.cert))
        self.assertEqual(self.check(keyFirst, None), keyFirst)

    def test_noKeyInCertificateFile(self):
        """
        A certificate file without a key, given without a key file, is
        refused, saying which flag gives the key.
        """
        e = self.assertRaises(TLSFileError, self.check, self.cert, None)
        self.assertOneLine(
            e, f'--health-cert-file: "{self.cert}" holds no PEM private key',
            "--health-key-file",
        )

    def test_garbage(self):
        """A garbage certificate or key is refused in one line, not a traceback."""
        garbage = self.write("garbage.pem", b"garbage\n")
        e = self.assertRaises(TLSFileError, self.check, garbage, self.key)
        self.assertOneLine(e, f'--health-cert-file: "{garbage}" holds no PEM certificate')
        e = self.assertRaises(TLSFileError, self.check, self.cert, garbage)
        self.assertOneLine(e, f'--health-key-file: "{garbage}" holds no PEM private key')
        broken = self.write(
            "broken.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        e = self.assertRaises(TLSFileError, self.check, self.cert, broken)
        self.assertOneLine(e, f'--health-key-file: "{broken}"', "cannot be read")

    def test_mismatch(self):
        """A key that is not the certificate's is refused, naming both files."""
        _, otherKey = self.ca.issue(self.directory, "other", client=True)
        e = self.assertRaises(TLSFileError, self.check, self.cert, otherKey)
        self.assertOneLine(
            e, f'--health-key-file: "{otherKey}"', "not the one of the certificate",
            f'--health-cert-file "{self.cert}"',
        )

    def test_encryptedKey(self):
        """
        An encrypted key is refused: nothing could ask for its passphrase
        (OpenSSL would prompt on the terminal).
        """
        locked = encryptedKey(self.key, os.path.join(self.directory, "locked.key"))
        e = self.assertRaises(TLSFileError, self.check, self.cert, locked)
        self.assertOneLine(e, f'--health-key-file: "{locked}"', "encrypted")

    def test_specialFiles(self):
        """Special files as the certificate or the key are refused, unread."""
        e = self.assertRaises(TLSFileError, self.check, "/dev/zero", None)
        self.assertOneLine(e, '--health-cert-file: cannot read "/dev/zero"')
        e = self.assertRaises(TLSFileError, self.check, self.cert, "/dev/zero")
        self.assertOneLine(e, '--health-key-file: cannot read "/dev/zero"')


class BytesTests(TLSFilesTestCase):
    """
    What the configuration keeps: the bytes, checked, holding nothing else.
    """

    def setUp(self):
        super().setUp()
        self.ca = CertificateAuthority()
        self.cert, self.key = self.ca.issue(self.directory, "client", client=True)

    def test_readCertificates(self):
        """Every certificate of a bundle, in order, without the text around them."""
        from cryptography import x509

        other = CertificateAuthority("other CA")
        bundle = self.write(
            "bundle.pem",
            b"a comment\n" + self.read(self.ca.write(self.directory)) + b"between\n"
            + self.read(other.write(self.directory, "other")),
        )
        pem = readCertificates(bundle, "--trusted-ca-file")
        self.assertNotIn(b"comment", pem)
        self.assertNotIn(b"between", pem)
        self.assertEqual(
            x509.load_pem_x509_certificates(pem), [self.ca.certificate, other.certificate]
        )

    def test_readKeyPair(self):
        """
        The certificate (and the rest of its file's certificates, its chain)
        and the key alone, unencrypted PKCS#8, whether the key came from its
        own file or from the certificate file, before or after it.
        """
        from cryptography import x509

        chain = self.read(self.cert) + self.read(self.ca.write(self.directory))
        for cert, key in [
            (self.write("chain.pem", chain), self.key),
            (self.write("both.pem", self.read(self.key) + chain), None),
        ]:
            pair = readKeyPair(cert, key, "--health-cert-file", "--health-key-file")
            self.assertEqual(
                x509.load_pem_x509_certificates(pair.certificate),
                x509.load_pem_x509_certificates(chain),
            )
            self.assertTrue(pair.key.startswith(b"-----BEGIN PRIVATE KEY-----"))
            self.assertNotIn(b"CERTIFICATE", pair.key)
            self.assertNotIn("BEGIN", repr(pair))  # no key in logs

    def test_readKeyPairRefuses(self):
        """readKeyPair refuses what checkKeyPair refuses, in the same line."""
        _, otherKey = self.ca.issue(self.directory, "other", client=True)
        e = self.assertRaises(
            TLSFileError, readKeyPair, self.cert, otherKey, "--health-cert-file",
            "--health-key-file",
        )
        self.assertOneLine(e, "not the one of the certificate")
