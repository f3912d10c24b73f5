"""The demo and the longer experiment on synthetic scenes (``make demo``, ``make experiment``); not part of the package.

Run from the repository root: ``python -m examples.demo`` (see :mod:`examples.demo`). The configs they run are
``configs/demo/*.yaml`` of this checkout, found next to this folder.
"""
