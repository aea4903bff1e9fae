#!/usr/bin/env python3
"""GSM8K prompts with and without routing capture -> moe_routes.jsonl, timing.json (moe_routes.generate).

The product card's name for `moe-routes generate`; `python run_generate.py --help` shows the options.
"""

import sys

from moe_routes.generate import main

if __name__ == "__main__":
    sys.exit(main())
