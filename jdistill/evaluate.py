"""Alias of `python -m jdistill evaluate`, kept for existing scripts."""

import sys

if __name__ == "__main__":
  from jdistill.cli import main

  main([sys.argv[0], "evaluate", *sys.argv[1:]])
