"""``python -m spikingbrain.cli``: the ``spikingbrain`` command."""

import sys

from . import main

sys.exit(main())
