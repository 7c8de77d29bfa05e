"""Alias of `python -m jdistill task_world`, kept for existing scripts."""

import sys

if __name__ == "__main__":
  from jdistill.cli import main

  main([sys.argv[0], "task_world", *sys.argv[1:]])
