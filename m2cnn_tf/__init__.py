"""m2cnn-tf: M²CNN (Zhou et al., EMBC 2018) for diabetic retinopathy grading in TensorFlow/Keras."""

__version__ = "0.1.0"
