"""Train one stage of M²CNN: `python train.py --stage {1,2,3} --data OUT --model-dir DIR [flags]`.

See `python train.py --help` and m2cnn_tf/commands/train.py.
"""

from m2cnn_tf.commands.train import main

if __name__ == "__main__":
    main()
