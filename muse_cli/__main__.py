"""``python -m muse_cli``: the same as the ``muse`` console script."""

import sys

from muse_cli.main import main

sys.exit(main())
