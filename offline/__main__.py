"""``python -m offline --out DIR``: write every split to a folder and print the sizes (see offline/cli.py)."""
import sys

from .cli import main

sys.exit(main())
