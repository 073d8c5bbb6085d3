"""``python -m seal_diffusion.cli``: the ``seal-diffusion`` command."""

import sys

from . import main

sys.exit(main())
