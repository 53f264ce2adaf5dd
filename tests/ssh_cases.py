"""Cases for the SSH exec string, shared by its tests with a local shell and through sshd.

Argument vectors a remote command must receive unchanged, and whether a process
it started is still alive.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

__all__ = ["ARG", "NASTY", "alive"]

# What an argv element can be: any text but NUL (exec cannot carry it) and lone
# surrogates (not encodable, so never in a real argv either).
ARG = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))

NASTY = [
    "", " ", "two words", "it's", 'say "hi"', "$(touch /tmp/pwned)", "`id`", "a;b", "a && b",
    "line\nbreak", "tab\there", "back\\slash", "*", "~", "-n", "--", "$HOME", "'\"'\"'",
    "ünïcødé ✓", "\r\n", "!", "#comment", "{a,b}", "a|b", ">out", "<in",
]
"""Arguments that a command line quoted too little, or twice, would change."""


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
