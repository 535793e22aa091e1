"""``python -m multvae_cli``: the same as the ``multvae`` console script."""

import sys

from multvae_cli import main

sys.exit(main())
