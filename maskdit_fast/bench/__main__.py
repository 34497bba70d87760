import sys

from maskdit_fast.bench.cli import main

sys.exit(main())
