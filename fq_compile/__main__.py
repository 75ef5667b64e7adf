import sys

from fq_compile.tools.cli import main

sys.exit(main())
