"""``python -m slidechat.training --recipe ...`` / ``accelerate launch -m slidechat.training --recipe ...``."""

import sys

from slidechat.training.cli import main

sys.exit(main())
