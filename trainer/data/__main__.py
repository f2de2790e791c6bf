"""python -m trainer.data preview <overrides>: see trainer/data/preview.py."""

import sys

from trainer.data.preview import main

sys.exit(main())
