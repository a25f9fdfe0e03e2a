"""What runs inside the manager's Job pods, and the clients they talk back with.

``publish`` (a source → a ModelPack in the registry), ``materialize`` (a
ModelPack → a SharedPVC), ``pvc_reader`` (a mounted claim → an upload
session); each ends by the Job result protocol (``api/jobresult.py``).
``upload_client`` and ``report_client`` are how they reach the upload
gateway and the manager's report endpoint. ``controller/main.py`` dispatches
the ``modelcache-controller`` subcommands to them.
"""
