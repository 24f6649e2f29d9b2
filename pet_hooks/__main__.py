"""``python -m pet_hooks ...`` is the ``pet-hooks`` command."""
import sys

from .cli.main import main

sys.exit(main())
