"""Dialogs and widgets of the SARMAE plugin (Qt only, no engine code)."""
