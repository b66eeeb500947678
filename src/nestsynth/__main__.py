"""``python -m nestsynth`` (and ``torchrun ... -m nestsynth``): the command line."""

import sys

from .cli import main

sys.exit(main())
