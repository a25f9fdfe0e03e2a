"""modelpack: the shared core of modelcache.

Turns a directory of model files into a verified OCI ModelPack and back.
Everything else (the CSI node plugin, the controller, the CLI) stands on it;
it imports none of them.
"""
