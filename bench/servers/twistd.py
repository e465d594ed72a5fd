"""
``twistd``, exactly as its console script runs it, so the harness can start
it under any interpreter (``pypy3 twistd.py -n twistauth ...``).
"""

import sys

from twisted.scripts.twistd import run

if __name__ == "__main__":
    sys.argv[0] = "twistd"
    sys.exit(run())
