"""python -m trellis.cli: the same as the `trellis` command."""

import sys

from trellis.cli.main import main

sys.exit(main())
