"""TLS files for the REST and gRPC servers."""

from __future__ import annotations

import logging
import os
import ssl

import grpc

log = logging.getLogger("ferry.server")


class TLSFiles:
    """KServe's --ssl_certfile/--ssl_keyfile, checked at start-up; gRPC reads them again when
    they change (as KServe's REST server does), so a rotated certificate needs no restart."""

    def __init__(self, certfile: str, keyfile: str) -> None:
        self.certfile, self.keyfile = certfile, keyfile
        self._stamp = self._mtimes()
        try:
            self._pair = self._read()
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"TLS: cannot use --ssl_certfile {certfile} / --ssl_keyfile {keyfile}: {exc}") from None

    def _mtimes(self) -> tuple[float, float]:
        try:
            return os.stat(self.certfile).st_mtime, os.stat(self.keyfile).st_mtime
        except OSError:
            return (0.0, 0.0)

    def _read(self) -> tuple[bytes, bytes]:
        with open(self.keyfile, "rb") as key, open(self.certfile, "rb") as cert:
            return key.read(), cert.read()

    def grpc_credentials(self) -> grpc.ServerCredentials:
        def fetch() -> grpc.ServerCertificateConfiguration | None:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None  # unchanged: keep the current configuration
            try:
                self._pair, self._stamp = self._read(), stamp
            except OSError:
                return None
            log.info("gRPC: TLS certificate reloaded from %s", self.certfile)
            return grpc.ssl_server_certificate_configuration([self._pair])

        initial = grpc.ssl_server_certificate_configuration([self._pair])
        return grpc.dynamic_ssl_server_credentials(initial, fetch)
