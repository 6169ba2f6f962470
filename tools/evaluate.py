import sys

from diffdis.cli.evaluate import main

sys.exit(main())
