import sys

from tfz.cli import main

sys.exit(main())
