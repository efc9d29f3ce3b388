"""`python -m sdlora ...` (what `accelerate launch -m sdlora train ...` runs on each process)."""

import sys

from .cli import main

sys.exit(main())
