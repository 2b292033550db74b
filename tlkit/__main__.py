"""`python -m tlkit`: see `tlkit.cli`."""

import sys

from tlkit.cli import main

sys.exit(main())
