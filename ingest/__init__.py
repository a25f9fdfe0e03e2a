"""Ingest: bytes from a source to a verified ModelPack in a registry.

``sources/`` (Hugging Face, Ollama, HTTP(S), S3, a local directory, another
cluster's catalog: each opens, resolves, streams, and answers what upstream's
latest revision is) and ``publish/`` (the worker: stage each file once while
hashing, verify the formats, push, manifest last; the catalog import copies
blob to blob). Used by the CLI (``modelcache pack``), by the publish Job
(``jobs/publish.py``) and by the manager's upstream probe; it knows nothing
of Kubernetes.
"""
