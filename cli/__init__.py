"""The ``modelcache`` command line: pack, pull, inspect, demo."""
