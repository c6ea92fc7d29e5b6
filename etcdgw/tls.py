"""
Every TLS context and policy the gateway makes as a client of members, built
from the configuration: the trusted CA certificates (C{--trusted-ca-file};
the platform's trust store without it) and the client certificate and key
(C{--health-cert-file}, C{--discovery-cert-file}), as PEM bytes read and
checked once, at start, by L{etcdgw.tlsfiles}. Nothing here opens a file.

One L{ClientTLS} gives:
  - L{ClientTLS.context}: the pyOpenSSL context of a blocking validation
    handshake (SRV discovery's proofs, L{etcdgw.verify.validateTLS});
  - L{ClientTLS.creator}: a Twisted connection creator for one server name
    and ALPN list (SNI, and the certificate verified for that name): what
    anything connecting over TLS on the reactor uses;
  - L{TLSClientEndpoint}: TLS over any client endpoint, on the injected
    clock;
  - itself, as the L{IPolicyForHTTPS} of the etcd HTTP client
    (L{etcdgw.etcdhealth.EtcdClient}), which asks for each endpoint's
    L{server name<etcdgw.endpoint.Endpoint.serverName>}.

Both kinds of connection check the peer with the one verifier,
L{etcdgw.verify.peerVerifier}, so a refusal reads the same whichever path
met it; L{describeTLSError} turns a TLS failure into that one line.

Both verify the peer and speak TLS 1.2 at least (Twisted's default; raised
explicitly so an older Twisted does not lower it).
"""

import attr
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from etcdgw.tlsfiles import readCertificates, readKeyPair
from etcdgw.verify import CertificateRefused, peerVerifier, sslErrorText

#: The lowest TLS version any connection to a member speaks.
MINIMUM_VERSION = TLSVersion.TLSv1_2


class TLSHandshakeError(Exception):
    """
    A TLS handshake with a member failed for a reason other than its
    certificate (an alert, a closed connection, a timeout); the message is
    one line.
    """


class TLSSettingsError(ValueError):
    """
    The TLS settings cannot be used (PEM bytes that do not parse, a
    certificate without its key); the message says why, in one line.
    """


def _certificates(data, what):
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSSettingsError(f"{what}: no PEM certificate can be read")
    return certificates


@implementer(IPolicyForHTTPS)
class ClientTLS:
    """
    What the gateway trusts and presents as a TLS client of members, parsed
    once; every context, creator and policy it makes comes from here.

    @param caCertificates: PEM bytes of the trusted CA certificates, or
        L{None} for the platform's trust store.
    @param certificate: PEM bytes of the client certificate presented to
        members that ask for one (etcd's C{--client-cert-auth}), followed by
        its chain; or L{None} to present none.
    @param key: PEM bytes of its private key (unencrypted).
    @param insecure: verify nothing (C{--insecure-skip-tls-verify}): any
        certificate, any name.
    @raise TLSSettingsError: if the bytes cannot be used.
    """

    def __init__(self, caCertificates=None, certificate=None, key=None, insecure=False):
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if caCertificates is not None:
            authorities = _certificates(caCertificates, "CA certificates")
            self._trustRoot = trustRootFromCertificates(
                [Certificate(crypto.X509.from_cryptography(c)) for c in authorities]
            )
        else:
            self._trustRoot = platformTrust()
        if (certificate is None) != (key is None):
            raise TLSSettingsError("a client certificate needs its key, and a key its certificate")
        self.insecure = insecure
        #: What every context shares (keyword arguments of CertificateOptions).
        self._shared = {"raiseMinimumTo": MINIMUM_VERSION}
        if certificate is not None:
            chain = [
                crypto.X509.from_cryptography(c)
                for c in _certificates(certificate, "client certificate")
            ]
            try:
                privateKey = load_pem_private_key(key, password=None)
            except (TypeError, ValueError, UnsupportedAlgorithm) as e:
                raise TLSSettingsError(f"client key: cannot be read: {e}") from None
            self._shared.update(
                certificate=chain[0],
                extraCertChain=chain[1:],
                privateKey=crypto.PKey.from_cryptography_key(privateKey),
            )

    @classmethod
    def fromFiles(cls, caFile=None, certFile=None, keyFile=None):
        """
        A L{ClientTLS} from PEM files, read through L{etcdgw.tlsfiles} (the
        key from C{certFile} when C{keyFile} is L{None}). For callers that
        hold paths, not bytes; the configuration should hold the bytes.

        @raise etcdgw.tlsfiles.TLSFileError: if a file cannot be used.
        """
        ca = None if caFile is None else readCertificates(caFile, "--trusted-ca-file")
        if certFile is None:
            return cls(ca)
        pair = readKeyPair(certFile, keyFile, "client certificate", "client key")
        return cls(ca, pair.certificate, pair.key)

    def context(self):
        """
        A new pyOpenSSL context for a blocking client handshake: it verifies
        the peer against the trust and presents the client certificate, if
        any. The caller sets the name check on each connection
        (L{etcdgw.verify.validateTLS} does).

        @raise OpenSSL.SSL.Error: if OpenSSL refuses the key (not expected:
            L{etcdgw.tlsfiles} checked it with its certificate).
        """
        if self.insecure:
            return CertificateOptions(verify=False, **self._shared).getContext()
        return CertificateOptions(trustRoot=self._trustRoot, **self._shared).getContext()

    def creator(self, serverName, alpn=()):
        """
        The connection creator for a TLS connection to a member known as
        C{serverName} (a host name, sent as SNI, or an IP literal), offering
        the protocols C{alpn} (e.g. C{[b"h2"]}) if any: the certificate must
        chain to the trust and name C{serverName}, else the connection fails
        with L{etcdgw.verify.CertificateRefused} saying why.

        @rtype: L{IOpenSSLClientConnectionCreator}
        """
        options = optionsForClientTLS(
            serverName,
            trustRoot=self._trustRoot,
            acceptableProtocols=list(alpn) or None,
            extraCertificateOptions=dict(self._shared),
        )
        return _VerifyingCreator(options, serverName, self.insecure)

    def creatorForNetloc(self, hostname, port):
        """
        L{IPolicyForHTTPS}: the creator for C{hostname} (bytes, the
        request's host: the etcd client names the endpoint's server name).
        """
        return self.creator(hostname.decode("ascii"))


@implementer(IOpenSSLClientConnectionCreator)
@attr.s(frozen=True, slots=True)
class _VerifyingCreator:
    """
    Twisted's client creator (SNI, ALPN, the context), with the peer checked
    by L{peerVerifier} instead of Twisted's own callback: the same checks
    (the chain by OpenSSL, the name by service_identity), but a refusal
    fails the connection with its one-line reason (Twisted's gives a bare
    C{SSL.Error} for a chain that does not verify). Like Twisted's, the
    verifier fails the connection through the TLS protocol's public
    C{failVerification}.
    """

    _options = attr.ib()
    _serverName = attr.ib()
    _insecure = attr.ib(default=False)

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._insecure:
            connection.set_verify(SSL.VERIFY_NONE, lambda *args: True)
            return connection

        def refuse(reason):
            tlsProtocol.failVerification(Failure(CertificateRefused(reason)))

        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            peerVerifier(self._serverName, self._serverName, refuse),
        )
        return connection


@implementer(IStreamClientEndpoint)
@attr.s(frozen=True, slots=True)
class TLSClientEndpoint:
    """
    TLS over C{endpoint}'s connections, made by C{creator} (e.g.
    L{ClientTLS.creator}): Twisted's C{wrapClientTLS}, but with the TLS
    layer's timers (it gathers small writes until the next turn) on the
    injected C{clock}, not the global reactor.
    """

    clock = attr.ib()
    endpoint = attr.ib()
    creator = attr.ib()

    def connect(self, protocolFactory):
        factory = TLSMemoryBIOFactory(self.creator, True, protocolFactory, clock=self.clock)
        return self.endpoint.connect(factory).addCallback(lambda tls: tls.wrappedProtocol)


def describeTLSError(error):
    """
    One line for a TLS failure (an exception a connection failed with), or
    L{None} when C{error} is not one: C{"TLS handshake failed: ..."}.
    """
    if isinstance(error, (CertificateRefused, TLSHandshakeError)):
        return f"TLS handshake failed: {error}"
    if isinstance(error, SSL.Error):
        return f"TLS handshake failed: {sslErrorText(error)}"
    if isinstance(error, VerificationError):  # Twisted's own name check
        text = " ".join(str(error).split())
        return f"TLS handshake failed: certificate does not name the member: {text}"
    return None
