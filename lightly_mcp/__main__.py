"""``python -m lightly_mcp``: the ``lightly-mcp`` command line."""

import sys

from lightly_mcp.cli import main

sys.exit(main())
