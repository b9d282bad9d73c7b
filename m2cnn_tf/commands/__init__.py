"""The command lines, one module each: flags in, a library call, exit codes out (`m2cnn_tf.cli`)."""
