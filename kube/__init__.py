"""The Kubernetes toolkit under both the node plugin (``csi``) and the controller.

One of each: ``client`` (dict-in, dict-out API calls, one error hierarchy),
``informer`` (list + watch into a trimmed cache), ``workqueue``, ``leader``
(election), ``events``, ``logs`` (JSON logs, redaction), ``certs`` (CA and
serving certificates kept in a Secret), ``flags`` (command-line sizes) and
``httpreply`` (the small HTTP servers' replies). It knows the contract's
names (``api``) and nothing of what runs above it.
"""
