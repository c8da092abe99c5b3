"""``python -m seqpack.bench``: the same as the ``seqpack-bench`` command."""

from .cli import main

raise SystemExit(main())
