"""The selection rules moved to `kdflow.selection`, which multi-teacher KD shares; kept importable here."""

from kdflow.selection import OWN, SELECTIONS, SKIP, dualmince, no_selection, reference_rule, weighted

__all__ = ["OWN", "SELECTIONS", "SKIP", "dualmince", "no_selection", "reference_rule", "weighted"]
