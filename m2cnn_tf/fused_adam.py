"""Keras's Adam with each variable's update in one TensorFlow kernel (`ResourceApplyAdam`).

Why: Keras 3's Adam writes about fifteen graph ops per variable (its own step powers, both
moments, the update). In a traced tiny train step they are 41 % of all ops, and a run pays for
them in tracing, in Grappler and in every step. `ResourceApplyAdam` computes the same update in
the same order (alpha = lr·sqrt(1-β2^t)/(1-β1^t); m += (g-m)(1-β1); v += (g²-v)(1-β2);
w -= m·alpha/(sqrt(v)+ε)) in one op per variable, on CPU, GPU and under XLA. The figures are in
docs/training.md ("Optimizer").

Ours, not the paper's (it names no optimizer): the state is Keras's (iterations, momentums,
velocities, by the same names), so backups and checkpoints are the same files. The update is
Keras's up to rounding, not bit for bit: the kernel forms 1-β2 from the float32 β2 (1.0000047e-3
for 0.999), Keras from the Python float (1e-3), so the second moment differs by 5e-5 relative,
as if β2 were 0.99899995, the float32 value both already use for β2^t (tests/test_fused_adam.py).
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="m2cnn")
class FusedAdam(keras.optimizers.Adam):
    """Adam (Kingma & Ba) without AMSGrad, EMA or weight decay: the options the train step never
    sets, refused here rather than silently ignored by the fused kernel."""

    def __init__(self, learning_rate: float = 0.001, **kwargs):
        for option in ("amsgrad", "use_ema", "weight_decay"):
            if kwargs.get(option):
                raise ValueError(f"FusedAdam does not support {option}")
        super().__init__(learning_rate, **kwargs)

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        """Keras's per-variable `update_step`, replaced by one kernel per variable; the step's
        scalars are built once for all variables, in the cross-replica context Keras calls
        this in. Under a tf.distribute strategy each update runs on the variable's own copy."""
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1 = tf.constant(self.beta_1, tf.float32)
        beta_2 = tf.constant(self.beta_2, tf.float32)
        scalars = {
            "beta1_power": tf.pow(beta_1, step),
            "beta2_power": tf.pow(beta_2, step),
            "lr": tf.cast(learning_rate, tf.float32),
            "beta1": beta_1,
            "beta2": beta_2,
            "epsilon": tf.constant(self.epsilon, tf.float32),
        }

        def fused(variable, gradient):
            i = self._get_variable_index(variable)
            return tf.raw_ops.ResourceApplyAdam(
                var=variable.handle,
                m=self._momentums[i].value.handle,
                v=self._velocities[i].value.handle,
                grad=tf.cast(gradient, variable.dtype),
                **{k: tf.cast(s, variable.dtype) for k, s in scalars.items()},
            )

        for gradient, variable in grads_and_vars:
            distribution.extended.update(variable, fused, args=(gradient,), group=False)
