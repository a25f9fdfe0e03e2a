"""NodeCache: the CSI node plugin that delivers ModelPacks to pods.

Where things happen: ``identity.py`` and ``node.py`` serve the two CSI
services; ``cache.py`` keeps the node-local content-addressed cache (one
pull per digest, LRU eviction, scrub, recovery, inventory); ``mounts.py``
reads ``/proc/self/mountinfo`` and makes read-only bind mounts;
``resolver.py`` turns a volume's ``model``/``clusterModel`` into a registry
reference; ``errors.py`` maps every failure to a gRPC code, once;
``server.py`` wires them into a gRPC server; ``main.py`` is the command.
The gRPC stubs are generated from ``proto/csi.proto`` by ``stubs.py``.
"""
