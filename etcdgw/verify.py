"""
How the gateway checks a member's certificate, and proving one discovered
TLS endpoint with a real handshake.

L{peerVerifier} is the one check of a peer certificate, on every TLS
connection the gateway makes as a client (the validation handshakes here
and, through L{etcdgw.tls}, the etcd HTTP client's): the chain to the
trusted CAs (OpenSSL's verdict at each depth) and the name the leaf must
carry (RFC 6125, by service_identity), each refusal one line.

L{validateTLS} is blocking code (a plain socket, bounded by a timeout):
discovery runs it off the reactor thread (see L{etcdgw.srvround}). etcd's
own gateway only makes a TCP connection here and never reads the CA file.

Every way a proof can fail is a L{ValidationError} with a one-line reason:
a certificate that service_identity cannot even check (no subject
alternative name, a C{*} name) is as refused as one naming another host.
The handshake waits with C{poll}, not C{select}, which cannot take a
descriptor >= 1024 (a gateway with about 500 clients has those).
"""

import ipaddress
import select
import socket
import time

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from service_identity.hazmat import DNS_ID
from twisted.logger import Logger

from etcdgw.endpoint import formatHostPort
from etcdgw.fast.gate import verifyErrorText

_log = Logger()


class ValidationError(Exception):
    """
    An endpoint could not be proven; the message says why, in one line.
    """


class CertificateRefused(Exception):
    """
    L{peerVerifier} refused a peer's certificate during a handshake; the
    message says why, in one line.
    """


def sslErrorText(error):
    """
    One line from an C{SSL.Error} (a list of OpenSSL error tuples).
    """
    reasons = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]))
    return "; ".join(reasons) or str(error) or type(error).__name__


def _verifyErrorString(code):
    # OpenSSL's text for the code comes through pyOpenSSL's private binding
    # (no public API gives it): etcdgw.fast.gate keeps that use, and its
    # fallback, with the gateway's other uses of private names.
    return verifyErrorText(code)


def validateTLS(address, port, name, trust, timeout, context=None):
    """
    Connect to C{address}:C{port} (an IP), make a TLS handshake, and check
    the certificate with L{peerVerifier}: it chains to C{trust} and names
    C{name} (RFC 6125, by service_identity).

    C{name} is a host name (sent as SNI, matched against the certificate's
    DNS names) or an IP literal (an SRV target may be one, as in etcd,
    which dials it as an address): then no SNI is sent (RFC 6066 forbids an
    address there) and it must be one of the certificate's IP addresses.

    @param trust: what makes the context when C{context} is not given: an
        L{etcdgw.tls.ClientTLS}.
    @param context: a context from C{trust.context()}, to reuse.
    @return: L{None} once proven.
    @raise ValidationError: with a one-line reason otherwise.
    """
    isAddress = _isAddress(name)
    if not isAddress:
        try:
            DNS_ID(name)
        except (ValueError, TypeError, ImportError):
            raise ValidationError(
                f'"{name}" is not a host name a certificate can name'
            ) from None
    if context is None:
        context = trust.context()
    where = formatHostPort(address, port)
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ValidationError(f"cannot open a socket to {where}: {e.strerror or e}") from None
    failures = []
    verifier = peerVerifier(name, where, failures.append)

    try:
        sock.settimeout(max(timeout, 0.001))
        try:
            sock.connect((address, port))
        except socket.timeout:
            raise ValidationError(f"connect to {where} timed out") from None
        except OSError as e:
            raise ValidationError(f"connect to {where}: {e.strerror or e}") from None
        sock.setblocking(False)
        conn = SSL.Connection(context, sock)
        conn.set_verify(SSL.VERIFY_PEER, verifier)
        if not isAddress:
            try:
                conn.set_tlsext_host_name(name.encode("idna"))
            except UnicodeError:
                raise ValidationError(
                    f'"{name}" is not a host name a certificate can name'
                ) from None
        conn.set_connect_state()
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                _wait(sock, deadline, where, read=True)
            except SSL.WantWriteError:
                _wait(sock, deadline, where, read=False)
            except (SSL.SysCallError, OSError) as e:
                reason = e.args[-1] if e.args else e
                raise ValidationError(
                    f"TLS handshake with {where} failed: {reason}"
                ) from None
            except SSL.Error as e:
                if failures:
                    raise ValidationError(failures[0]) from None
                raise ValidationError(
                    f"TLS handshake with {where} failed: {sslErrorText(e)}"
                ) from None
        if failures:  # pragma: no cover - OpenSSL fails the handshake first
            raise ValidationError(failures[0])
        if not verifier.leafChecked:  # pragma: no cover - OpenSSL always asks
            raise ValidationError(f"certificate of {where} was not checked against {name}")
        try:
            conn.shutdown()
        except SSL.Error:
            pass
    finally:
        sock.close()


def peerVerifier(name, where, refuse):
    """
    A pyOpenSSL verify callback (for C{Connection.set_verify}) that accepts
    the peer's certificate only if it chains to the context's trust
    (OpenSSL's verdict, at every depth) and the leaf names C{name}: a host
    name, matched against its DNS names, or an IP literal, against its IP
    addresses (an SRV target may be one, as in etcd, which dials it as an
    address). Nothing escapes it: any error refuses.

    @param where: C{host:port} (or the name) of the peer, for messages.
    @param refuse: called once, with the one-line reason, at the first
        refusal; the handshake then fails.
    @return: the callback; its C{leafChecked} says whether the leaf's name
        was checked (and passed).
    """
    return _PeerVerifier(name, where, refuse)


class _PeerVerifier:
    """
    See L{peerVerifier}.
    """

    def __init__(self, name, where, refuse):
        self.name = name
        self.where = where
        self.refuse = refuse
        self.refused = None
        self.leafChecked = False

    def __call__(self, connection, certificate, errnum, depth, ok):
        if self.refused is not None:
            return False
        try:
            if not ok:
                reason = (
                    f"certificate verify failed: {_verifyErrorString(errnum)} "
                    f"(depth {depth}, subject CN={_commonName(certificate)})"
                )
            elif depth == 0:
                reason = self._nameProblem(certificate.to_cryptography())
                self.leafChecked = reason is None
            else:
                reason = None
        except Exception as e:  # an OpenSSL callback must not raise
            reason = (
                f"certificate of {self.where} cannot be checked against {self.name}: "
                f"{type(e).__name__}: {_oneLine(e)}"
            )
        if reason is None:
            return True
        self.refused = reason
        try:
            self.refuse(reason)
        except Exception:  # the handshake fails all the same
            _log.failure("while refusing the certificate of {where}", where=self.where)
        return False

    def _nameProblem(self, certificate):
        """
        Why C{certificate} does not name C{self.name}, or L{None}.
        """
        try:
            if _isAddress(self.name):
                verify_certificate_ip_address(certificate, self.name)
            else:
                verify_certificate_hostname(certificate, self.name)
        except VerificationError as e:
            return (
                f"certificate does not name {self.name} (it names "
                f"{_certificateNames(certificate)}): {e}"
            )
        except (CertificateError, ValueError) as e:
            # No subject alternative name, or one service_identity refuses
            # to match (a "*" alone): the certificate cannot name anything.
            return (
                f"certificate of {self.where} cannot be checked against {self.name}: "
                f"{_oneLine(e)}"
            )
        return None


def _commonName(certificate):
    from cryptography.x509.oid import NameOID

    subject = certificate.to_cryptography().subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value if names else subject.rfc4514_string()


def _isAddress(name):
    """
    Whether C{name} is an IP literal (an IPv6 one may carry a scope ID).
    """
    try:
        ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    return True


def _oneLine(error):
    return " ".join(str(error).split()) or type(error).__name__


def _wait(sock, deadline, where, read):
    """
    Wait until C{sock} is readable (or writable) or the deadline passes.
    C{poll} takes any descriptor; C{select} raises for one >= 1024.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ValidationError(f"TLS handshake with {where} timed out")
    poller = select.poll()
    poller.register(sock, select.POLLIN if read else select.POLLOUT)
    # Milliseconds, rounded up: 0 would not wait at all.
    if not poller.poll(max(1, int(remaining * 1000 + 0.999))):
        raise ValidationError(f"TLS handshake with {where} timed out")


def _certificateNames(cert):
    """
    The DNS names and IP addresses a (C{cryptography}) certificate names.
    """
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative name"
    names = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in sans.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "no DNS name"
