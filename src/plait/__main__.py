"""`python -m plait`, as torchrun's `-m plait` starts it."""

from plait.cli import entry

entry()
