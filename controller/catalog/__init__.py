"""The catalog API: this cluster's Ready ClusterModels, served to other clusters.

``server`` (HTTP handlers and the read-only OCI proxy to the DMCR), ``auth``
(TokenReview + SubjectAccessReview, decisions cached briefly), ``ratelimit``
(a token bucket per client) and ``tls`` (the serving certificate). The
importing side lives in ``ingest.sources.catalog`` and
``controller.catalog.sources``.
"""
