#!/usr/bin/env python
"""Run a fedgen comparison in Flower's Ray simulation: ``python run_simulation.py --help``."""

import sys

from fedgen.simulation import main

if __name__ == "__main__":
    sys.exit(main())
