"""M²CNN assembly (Fig. 2): IRv2 BaseNet, the resolution-gated Multi-Cell, the Multi-Task heads.

`build_m2cnn` is the one way to build a model. It returns one flat functional graph for one
input resolution, as Keras's applications do, so every layer is reachable by `get_layer`.

Design choices the paper leaves open (README, "Deviations"):
- The Multi-Cell groups sit after the BaseNet's last layer `conv_7b_ac` (1536 channels). Each
  group is Reduction-B + N Cell-C, like IRv2's tail, and ends with a 1x1 conv back to 1536
  channels (`medium_conv`, `large_conv`), the role `conv_7b` plays in IRv2. So `avg_pool` always
  sees 1536 channels and the heads of stage N-1 carry over to stage N unchanged, which is what
  "trained based on the weights of BaseNet+MT" (§III-A) asks for.
- The last Cell-C of each group is linear with scale 1.0, as IRv2's last block8.
- New groups start near identity (`cell_init="identity"`): every Cell-C's residual conv is zero
  and the 1x1 projection passes Reduction-B's max-pool branch through. A new group is then a
  3x3/2 max-pool of the features the heads already know, instead of noise between a trained
  backbone and trained heads, so stage N starts close to stage N-1's accuracy. The projection
  keeps its BatchNorm although, in training mode, BN renormalises that start: without it, Adam
  at LR2 moves the 2528-input projection so far in the first steps that the features blow up
  (measured on the demo: stage-2 train MSE 292 and val kappa 0.02, against 0.90 with BN).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import keras
import numpy as np
from keras import layers

from m2cnn_tf import cells
from m2cnn_tf.config import NUM_CLASSES, ModelConfig, get_preset, multi_cell_path
from m2cnn_tf.errors import UsageError, one_line

BACKBONE_OUTPUT = "conv_7b_ac"  # the BaseNet's last layer; "before switch" in Table I
POOL = "avg_pool"  # global average pooling that feeds both heads; "after multi-cell" in Table I
HEAD_LAYERS = ("logits", "score")
CELL_GROUPS = ("medium", "large")

IMAGENET_NOTOP = "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_resnet_v2/"
    + IMAGENET_NOTOP
)
IMAGENET_HASH = "d19885ff4a710c122648d3b5c3b684e4"


class WeightsUnavailable(UsageError):
    """The backbone weights could not be found or fetched; the message is one actionable line."""


def _backbone(x, preset):
    """Inception-ResNet-v2 up to conv_7b_ac, with N1/N2/N_C repeats (Fig. 2, 'BaseNet')."""
    width = preset.width
    x = cells.stem(x, width=width)
    for i in range(1, preset.n1 + 1):
        x = cells.inception_resnet_block(x, "block35", f"block35_{i}", width=width)
    x = cells.reduction_a(x, width=width)
    for i in range(1, preset.n2 + 1):
        x = cells.inception_resnet_block(x, "block17", f"block17_{i}", width=width)
    x = cells.reduction_b(x, "mixed_7a", width=width)
    x = cells.cell_c_stack(x, preset.n_c, "block8", width=width)
    return cells.conv2d_bn(x, cells.widths(width)(1536), 1, "conv_7b")


def _multi_cell_group(x, prefix: str, count: int, width: float):
    """§II-C Medial/large image cells: Reduction Cell-B, `count` Normal Cell-C, 1x1 to 1536."""
    x = cells.reduction_b(x, f"{prefix}_reduction_b", width=width)
    x = cells.cell_c_stack(x, count, f"{prefix}_block8", width=width)
    return cells.conv2d_bn(x, cells.widths(width)(1536), 1, f"{prefix}_conv")


def _init_group_near_identity(model: keras.Model, prefix: str, count: int) -> None:
    """Zero residuals and a pass-through projection of the max-pool branch (module docstring)."""
    for i in range(1, count + 1):
        conv = model.get_layer(f"{prefix}_block8_{i}_conv")
        conv.set_weights([np.zeros(w.shape, "float32") for w in conv.weights])
    proj = model.get_layer(f"{prefix}_conv")
    kernel = np.zeros(proj.kernel.shape, "float32")  # (1, 1, 992 + C, C), pool branch last
    channels = kernel.shape[-1]
    kernel[0, 0, -channels:, :] = np.eye(channels, dtype="float32")
    proj.set_weights([kernel])


def build_m2cnn(
    image_size: int,
    *,
    weights: str | None = None,
    preset: str = "paper",
    num_classes: int = NUM_CLASSES,
    cell_init: str = "identity",
    bn_momentum: float | None = None,
    multi_cell: bool = True,
    sync_bn: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Build M²CNN for one input resolution; the cells it gets follow Table I / §II-C.

    weights: None (random), "imagenet" (Keras's notop IRv2 weights, via Keras's cache) or a
    local file path (Keras's notop `.h5`, or a `.weights.h5` of an m2cnn model). Only the
    BaseNet is loaded; cells and heads stay freshly initialised.
    cell_init: "identity" (new Multi-Cell groups start as a max-pool, see above) or "random".
    bn_momentum: of every BatchNorm's moving averages; None keeps Keras's IRv2 value, 0.99,
    which suits the paper's 10k+ steps. A run of a few hundred steps needs ~0.9, or
    inference-mode statistics lag so far behind the weights that every prediction collapses to
    one grade.
    multi_cell: False builds the plain BaseNet+MT at any resolution, Table II's "Multi-Task"
    column at 448 and 720 px, the ablation against which M²CNN is compared.
    sync_bn: every BatchNorm computes its batch statistics over all replicas of the
    tf.distribute strategy it runs under (`set_batchnorm`).
    Outputs: {"logits": (B, num_classes), "score": (B, 1)}, float32 under any dtype policy.
    """
    if cell_init not in ("identity", "random"):
        raise UsageError(
            f"cell_init must be 'identity' or 'random', got {cell_init!r}", setting="cell_init"
        )
    p = get_preset(preset)
    path = multi_cell_path(image_size) if multi_cell else "small"
    groups = {"small": [], "medium": [("medium", p.n3)]}.get(
        path, [("medium", p.n3), ("large", p.n4)]
    )
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = _backbone(inputs, p)
    for prefix, count in groups:
        x = _multi_cell_group(x, prefix, count, p.width)
    x = layers.GlobalAveragePooling2D(name=POOL)(x)
    # §II-B Multi-Task: a 5-way classification head (CE, Eq. (2)) and a regression head (MSE,
    # Eq. (3)). float32 so losses stay exact under a mixed-precision policy.
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    score = layers.Dense(1, name="score", dtype="float32")(x)
    model = keras.Model(
        inputs,
        {"logits": logits, "score": score},
        name=name or f"m2cnn_{preset}_{image_size}",
    )
    if cell_init == "identity":
        for prefix, count in groups:
            _init_group_near_identity(model, prefix, count)
    set_batchnorm(model, momentum=bn_momentum, synchronized=sync_bn)
    if weights is not None and weights != "none":
        load_backbone_weights(model, weights, preset=preset)
    return model


def set_batchnorm(
    model: keras.Model, *, momentum: float | None = None, synchronized: bool = False
) -> None:
    """Every BatchNorm's moving-average momentum (None keeps it) and whether it computes its
    batch statistics over all replicas (Keras's `synchronized`, read when the layer is called).

    A synchronised layer saves `synchronized: true` in its config, which Keras loads in safe mode
    anywhere. In inference it computes exactly what an unsynchronised layer does; in training on
    one device, the same statistics up to float rounding (its variance is E[x²] − E[x]²).
    """
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            if momentum is not None:
                layer.momentum = momentum
            layer.synchronized = synchronized


def sync_bn_enabled(settings: ModelConfig, replicas: int) -> bool:
    """The model section's `sync_bn`, or by default: on with more than one replica."""
    return settings.sync_bn if settings.sync_bn is not None else replicas > 1


def build_from_settings(image_size: int, settings: ModelConfig, replicas: int = 1) -> keras.Model:
    """The network a run's model section describes, for a strategy of `replicas` replicas, with
    fresh weights: `training.initialise` loads what §III-A says it starts from
    (`settings.weights` or `settings.init`)."""
    return build_m2cnn(
        image_size,
        preset=settings.preset,
        num_classes=settings.num_classes,
        bn_momentum=settings.bn_momentum,
        multi_cell=settings.multi_cell,
        sync_bn=sync_bn_enabled(settings, replicas),
    )


def backbone_layer_names(model: keras.Model) -> list[str]:
    """Names of the BaseNet's layers with weights: everything before the Multi-Cell and heads."""
    skip = tuple(f"{g}_" for g in CELL_GROUPS)
    return [
        layer.name
        for layer in model.layers
        if layer.weights and not layer.name.startswith(skip) and layer.name not in HEAD_LAYERS
    ]


def resolve_imagenet_weights() -> str:
    """Path of Keras's notop IRv2 file: from Keras's cache, downloading it if needed."""
    try:
        return keras.utils.get_file(
            IMAGENET_NOTOP, IMAGENET_URL, cache_subdir="models", file_hash=IMAGENET_HASH
        )
    except Exception as err:  # no network, proxy, truncated download: all end the same way
        raise WeightsUnavailable(
            f"could not download ImageNet weights {IMAGENET_NOTOP} ({type(err).__name__}); "
            f"put that file in ~/.keras/models/, or give its path as the weights (or none)",
            setting="weights",
        ) from None


def load_backbone_weights(model: keras.Model, weights: str, *, preset: str = "paper") -> list[str]:
    """Load BaseNet weights into `model` by layer name; returns the names of the loaded layers.

    Keras's notop `.h5` (and a `.weights.h5` saved from Keras's IRv2) key layers by position,
    not by our names, so the file is first loaded into a reference BaseNet at the paper's
    counts (the same graph as Keras's IRv2), then copied by name: a `tiny` model gets the first
    blocks of every stack. A preset of another width (nano) fits none: refused.
    """
    if get_preset(preset).width != 1:
        raise WeightsUnavailable(
            f"the {preset} preset's widths fit no Inception-ResNet-v2 weights; use weights none",
            setting="weights",
        )
    if weights == "imagenet":
        weights = resolve_imagenet_weights()
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailable(
            f"weights file not found: {weights}; use imagenet, none or an existing file such "
            f"as {IMAGENET_NOTOP}",
            setting="weights",
        )
    inputs = keras.Input((None, None, 3))
    source = keras.Model(inputs, _backbone(inputs, get_preset("paper")), name="reference")
    try:
        source.load_weights(str(path))
    except (ValueError, OSError) as err:
        raise WeightsUnavailable(
            f"{weights} is not an Inception-ResNet-v2 notop weights file ({one_line(err)})",
            setting="weights",
        ) from None
    return copy_weights_by_name(source, model, only=backbone_layer_names(model))


def copy_weights_by_name(
    source: keras.Model, target: keras.Model, only: Iterable[str] | None = None
) -> list[str]:
    """Copy every layer of `source` into the same-named layer of `target` if all shapes match.

    This is the stage transfer of §III-A: what matches by name and shape arrives trained (LR1),
    everything else stays new (LR2). Returns the names of the layers copied.
    """
    wanted = None if only is None else set(only)
    copied = []
    for layer in target.layers:
        if not layer.weights or (wanted is not None and layer.name not in wanted):
            continue
        try:
            src = source.get_layer(layer.name)
        except ValueError:
            continue
        values = src.get_weights()
        if [v.shape for v in values] == [tuple(w.shape) for w in layer.weights]:
            layer.set_weights(values)
            copied.append(layer.name)
    return copied


def split_lr_groups(model: keras.Model, pretrained_layers: Sequence[str]) -> tuple[list, list]:
    """§III-A's two learning rates: (pretrained vars at LR1, new vars at LR2), trainable only."""
    pretrained = set(pretrained_layers)
    old, new = [], []
    for layer in model.layers:
        group = old if layer.name in pretrained else new
        group.extend(layer.trainable_weights)
    return old, new


def spatial_sizes(model: keras.Model) -> tuple[int, int]:
    """Table I: the feature-map side before the switch (conv_7b_ac) and after the Multi-Cell."""
    before = model.get_layer(BACKBONE_OUTPUT).output.shape[1]
    after = model.get_layer(POOL).input.shape[1]
    return int(before), int(after)
