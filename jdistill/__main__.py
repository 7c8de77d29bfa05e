"""`python -m jdistill <command>`: see `jdistill.cli`."""

if __name__ == "__main__":
  from jdistill.cli import main

  main()
