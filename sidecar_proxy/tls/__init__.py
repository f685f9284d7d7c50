"""mTLS and workload identity: SPIFFE certificates, TLS contexts, rotation, handshakes.

One module per job, in the order a connection meets them:

- :mod:`.spiffe`     SPIFFE ID syntax and allow-list patterns (pure strings)
- :mod:`.certs`      a mesh CA and workload certificates, for demos and tests
- :mod:`.identity`   this workload's identity from files, and the peer checks OpenSSL does not make
- :mod:`.contexts`   ``ssl.SSLContext`` builders and ssl errors -> reasons
- :mod:`.rotation`   re-read changed files, hand out contexts for *new* handshakes only
- :mod:`.handshake`  server upgrade of an accepted (already sniffed) connection; client origination
- :mod:`.reasons`    the fixed set of reasons a TLS connection is refused, for metrics labels

Listeners and clusters are wired to these by the proxy; nothing here knows
about config snapshots, metrics registries or routes.
"""
