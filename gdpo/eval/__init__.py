"""Held-out evaluation and reporting, beside training: ``gdpo eval`` (``evaluate.py``), the one definition
of every held-out figure (``metrics.py``, also used by the trainer, compress and the tiny policy's build),
``gdpo report`` (``report.py``) and ``gdpo compare`` (``compare.py``). Training's own per-step log is
``gdpo/metrics.py``."""
