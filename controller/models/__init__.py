"""The controller manager: Model and ClusterModel reconcilers on a small runtime of our own.

Where things happen (one file, one job):

* ``kube``: a thin JSON client over the ``kubernetes`` package's transport
  (dicts in, dicts out) and the API error hierarchy;
* ``informer``: list + watch into an in-memory cache, one per resource;
* ``workqueue``: per-key dedup, rate-limited requeue with backoff, delayed adds;
* ``leader``: leader election on a ``coordination.k8s.io`` Lease;
* ``jobs``: a Model's source → the publish Job (deterministic name, command, env);
* ``reconciler``: the level-triggered Model/ClusterModel reconcile;
* ``conditions``: phases, conditions and status documents;
* ``events``: core/v1 Events, recorded off the reconcile path;
* ``report``: the HTTP side: ``/healthz``, ``/readyz``, ``/metrics`` and the
  publish workers' progress reports;
* ``artifacts``: deleting a model's artifact from the registry;
* ``schedule``: ``spec.updatePolicy.schedule`` (cron in UTC, macros, ``@every``): when to look;
* ``upstream``: the look itself, per source kind (commit, tag digest, ETag, listing hash);
* ``app``: wiring, the ``manager`` subcommand's body.

docs/architecture.md ("Control plane") says why this is not kopf.
"""
