import sys

from tests.battery.harness import main

sys.exit(main())
