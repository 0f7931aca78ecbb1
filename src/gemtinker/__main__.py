import sys

from gemtinker.cli import main

sys.exit(main())
