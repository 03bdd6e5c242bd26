"""``python -m lightly_mcp``: the ``lightly-mcp`` command line."""

import sys

from lightly_mcp.app.cli import main

sys.exit(main())
