"""``python -m seqpe_nd.tasks.cli …`` (what ``torchrun -m`` runs) is the ``seqpe-nd`` command."""

import sys

from seqpe_nd.tasks.cli import main

sys.exit(main())
