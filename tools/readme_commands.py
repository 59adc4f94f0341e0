"""Prints the README's numbered install commands, so CI runs exactly what a user copies.

    python tools/readme_commands.py 1   # the install + demo command
    python tools/readme_commands.py 2   # the install + tests command

A command is the line after a ``# N. …`` comment line (and its ``#`` continuation lines) in the README's first
bash block.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def bash_blocks(text: str) -> list[str]:
    """The bodies of the README's ```bash fenced blocks, in order."""
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def numbered_commands(text: str) -> dict[int, str]:
    """``{1: "python3 -m venv … && prune2deploy demo …", 2: …}`` from the first bash block."""
    commands: dict[int, str] = {}
    number = None
    for line in bash_blocks(text)[0].splitlines():
        heading = re.match(r"#\s*(\d+)\.", line)
        if heading:
            number = int(heading.group(1))
        elif line.startswith("#") or not line.strip():
            continue
        elif number is not None:
            commands[number] = line.strip()
            number = None
    return commands


if __name__ == "__main__":
    print(numbered_commands(README.read_text())[int(sys.argv[1])])
