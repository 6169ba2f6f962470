import sys

from diffdis.cli.ablation import main

sys.exit(main())
