"""Alias of `python -m jdistill experiment`, kept for existing scripts."""

import sys

if __name__ == "__main__":
  from jdistill.cli import main

  main([sys.argv[0], "experiment", *sys.argv[1:]])
