"""`python -m ddim_fast.cli ...`: the `ddim-fast` command (torchrun runs it this way: -m ddim_fast.cli)."""

import sys

from . import main

sys.exit(main())
