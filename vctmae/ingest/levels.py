"""Vertebra level names and the label schemes that encode them.

Crops are always named by anatomical level (`T12`, `L1`, …) whatever the
label scheme of the input segmentation.
"""

from __future__ import annotations

from vctmae.errors import UsageError

# Anatomical order, head to feet. T13 and L6 are normal anatomical variants.
LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 14)),
    *(f"L{i}" for i in range(1, 7)),
)

# VerSe: 1–7 C1–C7, 8–19 T1–T12, 20–25 L1–L6, 28 T13.
VERSE: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{7 + i: f"T{i}" for i in range(1, 13)},
    **{19 + i: f"L{i}" for i in range(1, 7)},
    28: "T13",
}

# TotalSegmentator v2 "total": C1=50 … C7=44, T1=43 … T12=32, L1=31 … L5=27, S1=26.
TOTALSEG: dict[int, str] = {
    **{51 - i: f"C{i}" for i in range(1, 8)},
    **{44 - i: f"T{i}" for i in range(1, 13)},
    **{32 - i: f"L{i}" for i in range(1, 6)},
}

# VerSe's sacrum and coccyx: labelled, but no vertebra level.
VERSE_SACRUM, VERSE_COCCYX = 26, 27

SCHEMES: dict[str, dict[int, str]] = {"verse": VERSE, "totalseg": TOTALSEG}

VERSE_LABEL: dict[str, int] = {name: value for value, name in VERSE.items()}


def level_index(level: str) -> int:
    """Position of `level` in head-to-feet order (for sorting and ranges)."""
    try:
        return LEVELS.index(level)
    except ValueError:
        raise ValueError(
            f"unknown vertebra level {level!r}; expected one of {', '.join(LEVELS)}"
        ) from None


def parse_levels(spec: str | None) -> frozenset[str] | None:
    """Parse `--levels`: a range 'T1-L6', a list 'T12,L1,L2', or a mix. None keeps all.

    A range follows anatomical order and includes T13/L6 variants that lie inside it.
    Raises `UsageError` naming `--levels` for an unknown level or an upward range.
    """
    if spec is None or spec.strip() == "":
        return None
    chosen: set[str] = set()
    try:
        for part in spec.split(","):
            part = part.strip().upper()
            if "-" in part:
                first, last = (p.strip() for p in part.split("-", 1))
                lo, hi = level_index(first), level_index(last)
                if lo > hi:
                    raise UsageError(
                        f"--levels: range {part!r} runs upwards; write it head to feet, e.g. T1-L6"
                    )
                chosen.update(LEVELS[lo : hi + 1])
            else:
                level_index(part)
                chosen.add(part)
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(f"--levels: {error}") from None
    return frozenset(chosen)
