import sys

from diffdis.cli.sample import main

sys.exit(main())
