"""Serve a trained stage as a web page and HTTP API that grade fundus photographs.

    python serve.py --model-dir DIR --stage N [--host 127.0.0.1] [--port 8000] [--token TOKEN]

See m2cnn_tf/commands/serve.py (or `python serve.py --help`) for the flags.
"""

from m2cnn_tf.commands.serve import main

if __name__ == "__main__":
    main()
