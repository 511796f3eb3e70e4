"""``python -m qstrat``: the same as the ``qstrat`` command."""

from qstrat.cli import main

main()
