"""What every CLI's parser shares: the argument list convention (`command_line`) and value
ranges, declared once beside the code that needs them and checked in two places with one rule: by
that code's Python API (`Range.check`) and by the command-line flag that feeds it (`Range.flag`,
an argparse type). No torch here: every CLI's parser can use it, the report's too."""
import argparse
import math
import sys
from typing import List, Optional, Sequence


def command_line(argv: Optional[Sequence[str]] = None) -> List[str]:
    """The CLI's arguments (sys.argv[1:] unless given) without one leading `--`. torchrun needs
    `-m nsoclip.main -- FLAGS` (its own --logs-specs makes `--logs` ambiguous to it), so the
    same words work after `python -m nsoclip.main` too."""
    words = list(sys.argv[1:] if argv is None else argv)
    return words[1:] if words[:1] == ["--"] else words


class Range:
    """Numbers of one kind (int or float) within optional bounds; floats must be finite."""

    def __init__(self, kind=float, *, at_least: Optional[float] = None, above: Optional[float] = None,
                 at_most: Optional[float] = None):
        self.kind, self.at_least, self.above, self.at_most = kind, at_least, above, at_most

    @property
    def rule(self) -> str:
        if self.at_least is not None and self.at_most is not None:
            return f"in [{self.at_least:g}, {self.at_most:g}]"
        parts = [f">= {self.at_least:g}" if self.at_least is not None else "",
                 f"> {self.above:g}" if self.above is not None else "",
                 f"<= {self.at_most:g}" if self.at_most is not None else ""]
        return " and ".join(part for part in parts if part) or "a number"

    def violated(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        if self.kind is int and not isinstance(value, int):
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return True
        return ((self.at_least is not None and value < self.at_least)
                or (self.above is not None and value <= self.above)
                or (self.at_most is not None and value > self.at_most))

    def check(self, name: str, value, error=ValueError):
        """`value` unchanged, or `error` naming it; for the Python API."""
        if self.violated(value):
            kind = "an integer" if self.kind is int else "a finite number"
            raise error(f"{name} {value!r}: must be {kind} {self.rule}")
        return value

    def flag(self):
        """An argparse type; its message reads '--flag VALUE: must be ...' through params.Parser."""
        def convert(text: str):
            value = self.kind(text)  # a ValueError here is argparse's own 'invalid int value' message
            if self.violated(value):
                raise argparse.ArgumentTypeError(f"{value!r}: must be {self.rule}")
            return value
        convert.__name__ = self.kind.__name__
        return convert


POSITIVE_INT = Range(int, at_least=1)
NON_NEGATIVE_INT = Range(int, at_least=0)
NON_NEGATIVE = Range(float, at_least=0)
POSITIVE = Range(float, above=0)
FRACTION = Range(float, at_least=0, at_most=1)
