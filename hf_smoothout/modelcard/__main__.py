"""``python -m hf_smoothout.modelcard``: see `hf_smoothout.modelcard.cli`."""

import sys

from .cli import main

sys.exit(main())
