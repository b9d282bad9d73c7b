"""Evaluate a trained stage as in Table II / III: see m2cnn_tf/commands/evaluate.py (--help)."""

from m2cnn_tf.commands.evaluate import main

if __name__ == "__main__":
    main()
