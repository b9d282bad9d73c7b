"""Grade fundus photographs with a trained stage: see m2cnn_tf/commands/predict.py (--help)."""

from m2cnn_tf.commands.predict import main

if __name__ == "__main__":
    main()
