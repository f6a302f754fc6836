"""``python -m lowbit.cli`` (as torchrun launches it)."""

import sys

from lowbit.cli.main import main

sys.exit(main())
