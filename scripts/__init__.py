"""The command-line tools of the checkout, importable as modules (``scripts.loadtest``) so that
tests use their logic directly. Each script runs standalone as ``python scripts/NAME.py``: it
then puts the checkout's root on ``sys.path`` itself, two lines at its top, and imports what
the scripts share from ``scripts._common`` and ``scripts._deps``."""
