import sys

from tbt.cli import main

sys.exit(main())
