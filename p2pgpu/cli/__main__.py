import sys

from p2pgpu.cli import main

sys.exit(main())
