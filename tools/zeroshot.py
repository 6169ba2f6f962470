import sys

from diffdis.cli.zeroshot import main

sys.exit(main())
