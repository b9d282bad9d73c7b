"""Export a trained stage as a TF SavedModel or a LiteRT model (see m2cnn_tf/commands/export.py).

python export.py --model-dir DIR --stage N --format savedmodel|litert
    [--quantize none|float16|dynamic|int8] [--calibration DATA] [--out PATH]
"""

from m2cnn_tf.commands.export import main

if __name__ == "__main__":
    main()
