"""``python -m tools.release_parity --scenic DIR --out DIR``: see :mod:`tools.release_parity.write`."""

from tools.release_parity.write import main

main()
