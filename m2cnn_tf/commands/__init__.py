"""The command lines: one module per command, each with `run(argv) -> exit code` and `main()`."""
