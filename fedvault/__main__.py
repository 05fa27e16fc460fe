"""``python -m fedvault`` is the ``fedvault`` command."""

import sys

from fedvault.cli import main

sys.exit(main())
