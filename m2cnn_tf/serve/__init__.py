"""The grader behind serve.py: a web page and an HTTP API that grade uploaded photographs.

`app` (routes, access control, headers), `grader` (the model side), `batching` (which images
share a model call), `uploads` (what a request carries, within limits) and `image_headers`
(what a file is and how large it would decode). Only `m2cnn_tf.commands.serve` imports it.
"""
