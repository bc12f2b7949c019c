"""``python -m kn_plugin.cli``: the ``kn`` command."""

import sys

from kn_plugin.cli import main

sys.exit(main())
