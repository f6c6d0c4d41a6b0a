"""The `steer-heal` command line: parses options and calls the library."""
