"""Entry point of one torchrun rank for ``plan run`` (``python -m codegen.rank``).

A module of its own: ``python -m codegen.check`` would run a module the package
``__init__`` already imported, which runpy warns about on every rank.
"""

import sys

from codegen.check import main

if __name__ == "__main__":
    sys.exit(main())
