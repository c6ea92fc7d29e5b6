"""
Reading the PEM files the flags name (C{--trusted-ca-file},
C{--health-cert-file}/C{--health-key-file},
C{--discovery-cert-file}/C{--discovery-key-file}), once, at start.

Every one is read by L{readPEMFile}: regular files only (a FIFO or
C{/dev/zero} would hang the start or fill the memory), at most L{MAX_BYTES}.
A certificate and its key are checked as a pair (L{checkKeyPair}): both
parse, the key is not encrypted (nothing could ask for its passphrase) and
it is the certificate's. Every failure is a L{TLSFileError} whose message is
one line naming the flag, the file and the reason.

What is read is kept as bytes (L{readCertificates}, L{readKeyPair}): the
configuration holds them, and L{etcdgw.tls} builds every TLS context from
them, so no file is opened again after the start.
"""

import os
import stat

import attr

#: The largest PEM file read: a CA bundle of a thousand certificates fits.
MAX_BYTES = 1 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


class TLSFileError(ValueError):
    """
    A PEM file named by a flag cannot be used; the message is one line naming
    the flag, the file and the reason.
    """


def _quoted(path, limit=80):
    if len(path) > limit:
        return f'"{path[:limit]}..."'
    return f'"{path}"'


def _kind(mode):
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def readPEMFile(path, flag, limit=MAX_BYTES):
    """
    Read the file C{path} that C{flag} names, if it is a regular file of at
    most C{limit} bytes.

    The file is checked with C{stat} before it is opened (opening a device
    can have effects of its own), opened without blocking (a FIFO with no
    writer) and checked again once open (it may have been replaced).

    @return: its bytes.
    @raise TLSFileError: naming C{flag} and C{path}.
    """

    def refuse(reason):
        return TLSFileError(f"{flag}: cannot read {_quoted(path)}: {reason}")

    if "\0" in path:
        raise refuse("a file name cannot hold a NUL byte")
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as e:  # ValueError: a name the platform cannot encode
        raise refuse(getattr(e, "strerror", None) or str(e)) from None
    if not stat.S_ISREG(mode):
        raise refuse(f"not a regular file ({_kind(mode)})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise refuse(e.strerror or str(e)) from None
    chunks = []
    size = 0
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            while size <= limit:
                chunk = os.read(fd, limit + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except OSError as e:
        raise refuse(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):  # replaced between the stat and the open
        raise refuse(f"not a regular file ({_kind(mode)})")
    if size > limit:
        shown = f"{limit >> 20} MiB" if limit and not limit % (1 << 20) else f"{limit} bytes"
        raise refuse(f"larger than {shown}: not a PEM file of certificates or keys")
    return b"".join(chunks)


def loadCertificates(path, flag):
    """
    The PEM certificates in C{path} (at least one), e.g. C{--trusted-ca-file}'s
    CA bundle.

    @return: a list of C{cryptography} certificates, in file order.
    @raise TLSFileError: naming C{flag} and C{path}.
    """
    return _certificates(readPEMFile(path, flag), path, flag)


def _certificates(data, path, flag):
    from cryptography import x509

    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSFileError(f"{flag}: {_quoted(path)} holds no PEM certificate")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSFileError(
            f"{flag}: {_quoted(path)} holds no PEM certificate that can be read "
            "(a malformed one)"
        )
    return certificates


def readCertificates(path, flag):
    """
    The PEM certificates in C{path} (at least one), as PEM bytes holding
    nothing else (no key, no text between them), e.g. C{--trusted-ca-file}'s
    CA bundle for L{etcdgw.tls.ClientTLS}.

    @raise TLSFileError: naming C{flag} and C{path}.
    """
    return certificatesPEM(loadCertificates(path, flag))


def certificatesPEM(certificates):
    """
    PEM bytes of C{cryptography} certificates, in order.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    return b"".join(c.public_bytes(Encoding.PEM) for c in certificates)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class KeyPair:
    """
    A client certificate and its private key, as read and checked by
    L{readKeyPair}.

    @ivar certificate: PEM bytes: the certificate presented first, then the
        rest of its file's certificates (its chain), in file order.
    @ivar key: PEM bytes (PKCS#8, unencrypted) of its private key.
    """

    certificate: bytes = attr.ib(repr=False)
    key: bytes = attr.ib(repr=False)


def checkKeyPair(certPath, keyPath, certFlag, keyFlag):
    """
    Check a client certificate and its private key: C{certPath} holds a PEM
    certificate (the first is the one presented), C{keyPath} an unencrypted
    PEM private key that is that certificate's. Without C{keyPath}, the key
    is read from C{certPath} (a file holding both), as etcd does.

    @param certFlag: the flag naming C{certPath}, e.g. C{"--health-cert-file"}.
    @param keyFlag: the flag naming C{keyPath}.
    @return: the key's path: C{keyPath}, or C{certPath} when that is L{None}.
    @raise TLSFileError: naming the flag and the file at fault.
    """
    return _readKeyPair(certPath, keyPath, certFlag, keyFlag)[0]


def readKeyPair(certPath, keyPath, certFlag, keyFlag):
    """
    Read and check a client certificate and its key as L{checkKeyPair}
    does.

    @rtype: L{KeyPair}
    @raise TLSFileError: naming the flag and the file at fault.
    """
    return _readKeyPair(certPath, keyPath, certFlag, keyFlag)[1]


def _readKeyPair(certPath, keyPath, certFlag, keyFlag):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    certData = readPEMFile(certPath, certFlag)
    certificates = _certificates(certData, certPath, certFlag)
    certificate = certificates[0]
    if keyPath is None:
        keyPath, keyData = certPath, certData
        where = f"{certFlag}: {_quoted(certPath)}"
        missing = f"{where} holds no PEM private key (give it with {keyFlag})"
    else:
        keyData = readPEMFile(keyPath, keyFlag)
        where = f"{keyFlag}: {_quoted(keyPath)}"
        missing = f"{where} holds no PEM private key"
    if b"PRIVATE KEY-----" not in keyData:
        raise TLSFileError(missing)
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise TLSFileError(
            f"{where}: the private key is encrypted (no passphrase can be asked "
            "for: give it unencrypted)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSFileError(
            f"{where}: the private key cannot be read (malformed, or of a type "
            "that is not supported)"
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        matches = key.public_key().public_bytes(*spki) == (
            certificate.public_key().public_bytes(*spki)
        )
    except (ValueError, UnsupportedAlgorithm):
        raise TLSFileError(
            f"{certFlag}: {_quoted(certPath)}: the certificate's public key is of "
            "a type that is not supported"
        ) from None
    if not matches:
        raise TLSFileError(
            f"{where}: the private key is not the one of the certificate in "
            f"{certFlag} {_quoted(certPath)}"
        )
    pem = (
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return keyPath, KeyPair(certificatesPEM(certificates), key.private_bytes(*pem))
