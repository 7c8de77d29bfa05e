"""Alias of `python -m jdistill overlap`, kept for existing scripts."""

import sys

if __name__ == "__main__":
  from jdistill.cli import main

  main([sys.argv[0], "overlap", *sys.argv[1:]])
