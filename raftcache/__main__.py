import sys

from raftcache.cli import main

sys.exit(main())
