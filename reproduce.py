"""Reproduce the paper's Table II, Table III and Fig. 4: see m2cnn_tf/commands/reproduce.py
(--help)."""

from m2cnn_tf.commands.reproduce import main

if __name__ == "__main__":
    main()
