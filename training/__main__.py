"""``python -m training --recipe ...`` / ``accelerate launch -m training --recipe ...``."""

import sys

from slidechat.training.cli import main

sys.exit(main())
