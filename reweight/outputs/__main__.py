"""``python -m reweight.outputs <sweep_dir>``: write a sweep's results table by hand."""

import sys

from reweight.outputs.sweeps import main

sys.exit(main())
