"""`python -m raftcache.cli`, as `python -m raftcache` and the `raftcache` script."""

import sys

from raftcache.cli import main

sys.exit(main())
