"""``source.upload``: every piece of the upload path on the controller's side.

``gateway`` (the HTTP server users and PVC readers upload to: sessions,
resumable PUTs, verify and push), ``sessions`` (its staging directory and
size limit), ``client`` (the manager's client of the gateway: a session per
publish key, the token Secret) and ``reconcile`` (the Model reconcile step
for ``source.upload``: WaitForUpload → Publishing → Ready). The uploading
side is ``jobs/upload_client.py`` (used by ``modelcache upload`` and the PVC
reader Job).
"""
