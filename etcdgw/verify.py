"""
Proving one discovered TLS endpoint: a real TLS handshake whose certificate
chains to the trusted CAs and names the SRV target.

This is blocking code (a plain socket, bounded by a timeout): discovery runs
it off the reactor thread (see L{etcdgw.discovery}). etcd's own gateway only
makes a TCP connection here and never reads the CA file.

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

import attr
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID
from service_identity.pyopenssl import verify_hostname, verify_ip_address

from etcdgw.endpoint import formatHostPort
from etcdgw.fast.gate import verifyErrorText


class ValidationError(Exception):
    """
    An endpoint could not be proven; the message says why, in one line.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TLSTrust:
    """
    What a validation handshake trusts and presents.

    @ivar caFile: a PEM CA bundle, or L{None} for the system trust store.
    @ivar certFile: a PEM client certificate presented to members that ask
        for one (etcd's C{--client-cert-auth}), or L{None}.
    @ivar keyFile: its private key.
    """

    caFile: object = None
    certFile: object = None
    keyFile: object = None

    def context(self):
        """
        A fresh pyOpenSSL context that verifies the peer against the trust.

        @raise ValidationError: if a file cannot be loaded.
        """
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        try:
            if self.caFile is not None:
                ctx.load_verify_locations(_fs(self.caFile))
            else:
                ctx.set_default_verify_paths()
            if self.certFile is not None:
                ctx.use_certificate_chain_file(_fs(self.certFile))
                ctx.use_privatekey_file(_fs(self.keyFile or self.certFile))
        except SSL.Error as e:
            raise ValidationError(f"cannot load TLS files: {_sslError(e)}") from None
        return ctx


def _fs(path):
    return path.encode() if isinstance(path, str) else path


def _sslError(error):
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
    that the certificate chains to C{trust} and names C{name} (RFC 6125, by
    service_identity).

    C{name} is a host name (sent as SNI, matched against the certificate's
    DNS names) or an IP literal (an SRV target may be one, as in etcd,
    which dials it as an address): then no SNI is sent (RFC 6066 forbids an
    address there) and it must be one of the certificate's IP addresses.

    @param context: a context from L{TLSTrust.context}, to reuse; built
        from C{trust} when L{None}.
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

    def verify(conn, cert, errnum, depth, ok):
        if not ok and not failures:
            subject = cert.get_subject().CN or str(cert.get_subject())
            failures.append(
                f"certificate verify failed: {_verifyErrorString(errnum)} "
                f"(depth {depth}, subject CN={subject})"
            )
        return ok

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
        conn.set_verify(SSL.VERIFY_PEER, verify)
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
                    f"TLS handshake with {where} failed: {_sslError(e)}"
                ) from None
        if failures:  # pragma: no cover - OpenSSL fails the handshake first
            raise ValidationError(failures[0])
        try:
            if isAddress:
                verify_ip_address(conn, name)
            else:
                verify_hostname(conn, name)
        except VerificationError as e:
            names = _certificateNames(conn)
            raise ValidationError(
                f"certificate does not name {name} (it names {names}): {e}"
            ) from None
        except (CertificateError, ValueError) as e:
            # No subject alternative name, or one service_identity refuses
            # to match (a "*" alone): the certificate cannot name anything.
            raise ValidationError(
                f"certificate of {where} cannot be checked against {name}: {_oneLine(e)}"
            ) from None
        try:
            conn.shutdown()
        except SSL.Error:
            pass
    finally:
        sock.close()


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


def _certificateNames(conn):
    from cryptography import x509

    cert = conn.get_peer_certificate()
    if cert is None:
        return "nothing"
    cert = cert.to_cryptography()
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative name"
    names = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in sans.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "no DNS name"
