import sys

from trace_dist.cli import main

sys.exit(main())
