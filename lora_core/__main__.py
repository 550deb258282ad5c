"""``python -m lora_core``: see ``lora_core.cli``."""
import sys

from .cli import main

sys.exit(main())
