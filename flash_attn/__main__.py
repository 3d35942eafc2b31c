"""`python -m flash_attn`: the doctor (flash_attn/_doctor.py)."""

import sys

from flash_attn._doctor import main

sys.exit(main())
