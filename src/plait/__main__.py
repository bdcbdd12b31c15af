"""`python -m plait`, as torchrun's `-m plait` starts it."""

import sys

from plait.cli import main

sys.exit(main())
