"""A watch rule's `argv` pattern against a command line a local user wrote to stall it: the worst cases of
Python's re (what rules.py used before) next to RE2 (what it uses), one search each. Measuring ONLY.

    .venv/bin/python bench/argv.py

The text is what rules.py matches: the arguments joined by spaces, at most MAX_ARGV bytes of the command
line. Python's re is stopped at the first size past 2 s (its time grows exponentially or polynomially);
RE2 is timed on the largest text a rule ever sees.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ffrtmp_systemd.rules import MAX_ARGV, _regex

# (pattern, text of n bytes crafted against it)
CASES: list[tuple[str, Callable[[int], str]]] = [
    ("(a+)+$", lambda n: "a" * (n - 1) + "!"),  # nested repeat: exponential in re
    ("(a|aa)*$", lambda n: "a" * (n - 1) + "!"),  # ambiguous alternation under a repeat: exponential
    (".*-i.*rtmp.*live", lambda n: "-i" * (n // 2)),  # three repeats: polynomial (n^3 per search)
    ("-listen 1 .*rtmp://", lambda n: "-listen 1 " * (n // 10)),  # a README rule against its worst input
    ("(.*a){20}!", lambda n: "a" * (n - 1) + "!"),  # RE2's worst kind: its time grows with the pattern too
]


def timed(search: Callable[[Any], object], text: bytes | str) -> float:
    start = time.perf_counter()
    search(text)
    return time.perf_counter() - start


def main() -> None:
    print(f"| pattern | Python re: largest n under 2 s, its time | RE2 at n = {MAX_ARGV} (MAX_ARGV) |")
    print("|---|---|---|")
    for pattern, make in CASES:
        old, n, took = re.compile(pattern), 8, 0.0
        while took < 2 and n < MAX_ARGV:
            last, n = (n, took), n * 2 if n >= 64 else n + 2
            took = timed(old.search, make(n))
        new = _regex(pattern)
        t = min(timed(new.search, make(MAX_ARGV).encode()) for _ in range(5))
        beyond = f"{n} bytes: {took:.1f} s" if took >= 2 else f"none past 2 s up to {n}"
        shown = pattern.replace("|", "\\|")
        print(f"| `{shown}` | {last[0]} bytes: {last[1]:.3f} s; {beyond} | {t * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
