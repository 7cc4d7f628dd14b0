"""`python -m ffrtmp_systemd`: the CLI."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from .cli import main

main()
