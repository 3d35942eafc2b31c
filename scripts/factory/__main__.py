"""python3 -m scripts.factory: the wheel factory's CLI (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
