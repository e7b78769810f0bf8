import sys

from dnis.cli import main

sys.exit(main())
