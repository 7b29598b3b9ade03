"""``python -m ha_ingestor``."""

import sys

from ha_ingestor.cli import main

sys.exit(main())
