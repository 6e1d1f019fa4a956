"""Processing provider ``sarmae`` and its algorithms."""
