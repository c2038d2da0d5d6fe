import sys

from pytest_moe.cli import main

sys.exit(main())
