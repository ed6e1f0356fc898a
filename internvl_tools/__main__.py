"""`python -m internvl_tools` runs the CLI."""

from .cli.launch import main

if __name__ == "__main__":
    main()
