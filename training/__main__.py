"""``python -m training --recipe ...`` / ``accelerate launch -m training --recipe ...``."""

import sys

from training.cli import main

sys.exit(main())
