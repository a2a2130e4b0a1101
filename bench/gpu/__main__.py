"""`python -m bench.gpu --out DIR`: see bench/gpu/run.py and bench/gpu/README.md."""
import sys

from .run import main

sys.exit(main())
