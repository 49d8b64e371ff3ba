"""Print the generated verdict lines of a demo report, verbatim, for the results README.

The README quotes these instead of restating them, so the two cannot disagree:

    python docs/results/demo-default/quote_verdicts.py docs/results/demo-default/report.md
"""

from __future__ import annotations

import sys


def main(path: str) -> None:
    lines = open(path, encoding="utf-8").read().splitlines()
    section = ""
    for line in lines:
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("**(") or line.startswith("Verdict") or line.startswith("Do the adapters"):
            print(f"> {line}" if section else line)
            print(">")
        elif section.startswith("The paper's findings") and line.startswith("- "):
            print(f"> {line}")
            print(">")


if __name__ == "__main__":
    main(sys.argv[1])
