"""Hydra configs of the ``reweight`` app, installed as the package ``reweight.conf``.

The folder is a package only so that Hydra can load it as ``pkg://reweight.conf`` from an
installed wheel; it holds no code. See ``conf/config.yaml`` for the root config.
"""
