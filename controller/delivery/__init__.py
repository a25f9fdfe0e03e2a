"""Workload delivery: what happens between a workload's annotation and its mounted model.

``webhook`` (the admission webhook; the pod-spec change itself is the pure
``api.inject``) and ``webhookconfig`` (its MutatingWebhookConfiguration and CA
bundle), ``gates`` (lifts the scheduling gate once every model is Ready, adds
the cache-aware affinity), ``sharedpvc`` (one RWX PVC per namespace and
digest) and ``materializer`` (the Job that fills it; the work inside the Job
is ``jobs/materialize.py``).
"""
