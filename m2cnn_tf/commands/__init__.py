"""The command lines of m2cnn-tf: one module per command, each with `run(argv) -> int` and the
console-script entry point `main()`, all on the contract of `m2cnn_tf.cli`."""
