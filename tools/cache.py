import sys

from diffdis.cli.cache import main

sys.exit(main())
