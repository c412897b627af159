"""Run at start-up by the Ray worker processes of ``--tune_tool=ray`` (this folder is on their ``PYTHONPATH``).

RecBole 1.2.1 caps Ray at 2.6.3, whose Tune imports its TensorBoard logger with ``np.bool8``, an alias numpy 2
removed; a worker would fail before it runs a trial. The driver has :mod:`recbole_llm.compat`; a worker gets this
one alias back here, without importing torch or RecBole at every worker start.
"""

import numpy

if "bool8" not in numpy.__dict__:
    numpy.bool8 = numpy.bool_
