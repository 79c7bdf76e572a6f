import sys

from fisherforget.bench.cli import main

sys.exit(main())
