"""The release-parity fixtures (tests/data/release_parity): the authors' JAX LOCA step run once at a tiny size,
unmodified, and everything it saw written for tests that run without JAX. Modules: ``capture`` (run and observe the
release's step), ``record`` (the fixture arrays), ``check`` (float64 re-derivations), ``write`` (files and the
command line). The files' format and the environment: tests/data/release_parity/README.md.
"""
