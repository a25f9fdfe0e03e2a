"""The ``modelcache`` command: thin commands over the layers below.

``main`` (the parser), ``pack``, ``pull`` (pull and inspect), ``upload``,
``bundle`` (export/import for the air gap; the format is
``modelpack/oci/bundle.py``), ``demo`` (the whole system on loopback, from
``local/``), ``access`` (registry flags and credentials), ``progress``.
It never imports the controller.
"""
