"""``python -m atprune`` (what ``torchrun -m atprune`` starts in every process): the command-line tool."""

import sys

from atprune.cli import main

sys.exit(main())
