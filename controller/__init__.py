"""The control plane: ``modelcache-controller``, the manager and its servers.

``main.py`` (the command: ``manager``, ``upload-gateway``, and the Job
subcommands it hands to ``jobs/``), ``app.py`` (the manager's wiring: informers,
queues, leader election, servers), ``models/`` (the Model/ClusterModel
reconcile: plan, publish Job, result, adoption, upstream schedule, progress
reports, finalize), ``upload/`` (the upload gateway and the manager's side
of it), ``delivery/`` (admission webhook, scheduling gates, SharedPVC and its
materializer Jobs), ``catalog/`` (the catalog API and ModelCatalogSource),
``embedded/`` (the demo's Job runner), ``jobspec.py`` (the one Job builder),
``errors.py`` (the reconcile contract's errors) and ``metrics.py``.
"""
