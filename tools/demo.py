import sys

from diffdis.cli.demo import main

sys.exit(main())
