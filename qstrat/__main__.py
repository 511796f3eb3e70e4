"""``python -m qstrat``: the same as the ``qstrat`` command."""

from qstrat.entry import qstrat

qstrat()
