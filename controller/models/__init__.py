"""The Model / ClusterModel reconcile, one file per step.

* ``reconciler``: the level-triggered reconcile, read top to bottom in the
  order it runs;
* ``publishjob``: a Model's source → the publish Job (deterministic name,
  command, env, Secret copies);
* ``publish``: the Job's life: create, follow, read its result, apply it
  (Ready with artifact and resolved metadata) or fail;
* ``pvcsource``: ``source.pvc``: the reader Job that streams a claim to the
  upload gateway (``source.upload`` itself is in ``controller/upload``);
* ``adopt``: an artifact pushed by ``modelcache import`` → Ready, no Job;
* ``schedule`` / ``upstream``: ``spec.updatePolicy.schedule``: when to look,
  and the look (each source's ``latest()``);
* ``report``: ``/healthz``, ``/readyz``, ``/metrics`` and the publish
  workers' progress reports;
* ``finalize`` / ``artifacts``: deletion: the artifact's tags and manifests
  go before the finalizer.

The runtime under it (client, informer, workqueue, leader election, events)
is the shared toolkit in ``kube/``; docs/architecture.md ("Control plane")
says why it is not kopf.
"""
