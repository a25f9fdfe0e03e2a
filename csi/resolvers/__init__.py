"""Resolvers: a volume's ``model``/``clusterModel`` → a registry reference.

``base`` (the ``Resolver`` protocol and volume-attribute parsing), ``file``
(``--models-file``: standalone nodes and tests) and ``kube`` (Model and
ClusterModel status from the API server through the shared informer).
"""
