import sys

from pktstream.cli import main

sys.exit(main())
