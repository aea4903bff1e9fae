import sys

from moe_routes.cli import main

sys.exit(main())
