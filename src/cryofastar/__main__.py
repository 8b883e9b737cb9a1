"""``python -m cryofastar ...`` is the ``cryofastar-stream`` command."""

from cryofastar.cli import main

main()
