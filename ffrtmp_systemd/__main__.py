"""`python -m ffrtmp_systemd`: the CLI, as the `ffrtmp` console script (the thin client first)."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from .client import main

main()
