#!/usr/bin/env python3
"""Expert-usage histograms and statistics from a moe_routes.jsonl log (``python plot_hist.py --help``).

The implementation lives in ``moe_routes.plot`` (also ``moe-routes plot``); this file keeps the name the
product card uses. Run from anywhere: the script's directory (the repository root) is on ``sys.path``.
"""

import sys

from moe_routes.plot import main

if __name__ == "__main__":
    sys.exit(main())
