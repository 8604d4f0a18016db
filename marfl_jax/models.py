"""Flax models of MAR-FL: the paper's MNIST CNN, an MLP and the text head, by `--model` name.

Every model is a plain flax.linen module: `params = model.init(key, x)`, `model.apply(params, x)`.
The simulator stacks N peers' params on a leading peer axis and trains them with
`jax.vmap(loss_and_grad)`, so what matters here is the speed of the *vmapped* step.

The CNN's convolutions (`CNN.conv_impl`, lowered by `marfl_jax.layers`, one params tree for all):
`gather` (default: im2col as one XLA gather, then one matmul; the fastest vmapped on CPU),
`shift_concat` (im2col by shifted slices) or `lax` (XLA's convolution, the natural choice on
GPUs). Conv2's bias and ReLU follow the 2x2 max pool, whose custom VJP is nn.max_pool's gradient.
Measurements, and the lowerings tried and dropped: benchmarks/RESULTS.md, "CNN convolution
lowering".

`MODELS` maps each `--model` name to a factory `factory(num_classes, **kwargs) -> nn.Module`;
registering one makes `get_model` build it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import layers
from marfl_jax.layers import CONV_IMPLS, DEFAULT_CONV_IMPL, ConvParams
from marfl_jax.registry import Registry


def _floating(x: jax.Array) -> jax.Array:
    """Floating inputs keep their dtype (bfloat16 under --compute_dtype); others -> float32."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _as_images(x: jax.Array) -> jax.Array:
    x = _floating(x)
    if x.ndim == 2 and x.shape[-1] == 784:
        return x.reshape(x.shape[0], 28, 28, 1)
    if x.ndim == 3:
        return x[..., None]
    return x


class CNN(nn.Module):
    """The paper's MNIST CNN (1,199,882 parameters with 10 classes).

    conv3x3(1->32, VALID) + ReLU, conv3x3(32->64, VALID) + ReLU, max-pool 2x2, flatten (9216),
    dense 128 + ReLU, dense num_classes.

    Input: float32 (B, 28, 28, 1) NHWC (also accepted: (B, 28, 28) and (B, 784)).
    Output: logits (B, num_classes).
    Parameters (identical tree for every conv_impl): conv1/{kernel (3,3,1,32), bias (32,)},
    conv2/{kernel (3,3,32,64), bias (64,)}, dense1/{kernel (9216,128), bias (128,)},
    dense2/{kernel (128,num_classes), bias (num_classes,)}.
    """

    num_classes: int = 10
    conv_impl: str = DEFAULT_CONV_IMPL

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_block(_as_images(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="dense1")(x))
        return nn.Dense(self.num_classes, name="dense2")(x)

    def conv_block(self, x: jax.Array) -> jax.Array:
        """conv1 + ReLU, conv2 + ReLU, 2x2 max pool: (B, 28, 28, Cin) -> (B, 12, 12, 64).

        Declares conv1 and conv2 (`ConvParams`); a subclass may override it with another
        lowering of the same params (benchmarks/conv_variants.py does).
        """
        k1, b1 = ConvParams(32, name="conv1")(x.shape[-1])
        k2, b2 = ConvParams(64, name="conv2")(32)
        h = nn.relu(layers.conv_valid(x, k1, self.conv_impl) + b1)
        z = layers.conv_valid(h, k2, self.conv_impl)
        # max(z + b) == max(z) + b and relu(max) == max(relu) exactly (monotone maps), so
        # pooling first moves conv2's bias add and ReLU onto a 4x smaller tensor.
        return nn.relu(layers.max_pool_2x2(z) + b2)


class MLP(nn.Module):
    """Multi-layer perceptron: flatten, [dense + ReLU] per hidden size, dense num_classes.

    Input: (B, ...) flattened to (B, D) (e.g. (B, 28, 28, 1) -> (B, 784)).
    Output: logits (B, num_classes). Layers are named dense1..dense{len(hidden)+1}.
    With hidden=(200,) and D=784, num_classes=10: 159,010 parameters.
    """

    num_classes: int = 10
    hidden: Sequence[int] = (200,)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _floating(x)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(int(width), name=f"dense{i + 1}")(x))
        return nn.Dense(self.num_classes, name=f"dense{len(self.hidden) + 1}")(x)


class TextHead(nn.Module):
    """The paper's 20 Newsgroups head on frozen 768-d text features: dropout 0.2, dense 768->72,
    ReLU, dropout 0.2, dense 72->num_classes (56,828 parameters for 20 classes).

    Input: (B, D) features. Output: logits (B, num_classes). Dropout is active only with
    `train=True`, which needs a `dropout` PRNG stream (`rngs={"dropout": key}`).
    """

    num_classes: int = 20
    hidden: int = 72
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _floating(x).reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.hidden, name="dense1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="dense2")(x)


def uses_dropout(model: nn.Module) -> bool:
    """Whether the model's training forward pass needs a `dropout` PRNG key."""
    return isinstance(model, TextHead) and model.dropout > 0


def count_params(params: Any) -> int:
    """Total number of scalars in a (single-peer) params pytree; works on ShapeDtypeStructs."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------------------------
# The registry: --model name -> factory(num_classes, **kwargs) -> nn.Module.
# --------------------------------------------------------------------------------------------

MODELS: Registry = Registry("model")


@MODELS.register("cnn")
def _cnn(num_classes: int, *, conv_impl: str = DEFAULT_CONV_IMPL) -> nn.Module:
    layers.check_choice(conv_impl, CONV_IMPLS, "conv_impl")
    return CNN(num_classes=num_classes, conv_impl=conv_impl)


@MODELS.register("mlp")
def _mlp(num_classes: int, *, hidden: Sequence[int] = MLP.hidden) -> nn.Module:
    hidden = tuple(int(h) for h in hidden)
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be >= 1; got {hidden}")
    return MLP(num_classes=num_classes, hidden=hidden)


@MODELS.register("text_head")
def _text_head(num_classes: int, *, hidden: int = TextHead.hidden,
               dropout: float = TextHead.dropout) -> nn.Module:
    return TextHead(num_classes=num_classes, hidden=hidden, dropout=dropout)


# What each factory's model takes (`Config.validate` pairs it with the dataset's `inputs`; a
# factory without the attribute is not checked).
_cnn.inputs = ("images",)
_mlp.inputs = ("images", "features")
_text_head.inputs = ("features",)

# The built-in names, for compatibility; MODELS.names() also lists models registered later.
MODEL_NAMES = MODELS.names()


def _check_keywords(name: str, factory: Any, kwargs: dict[str, Any]) -> None:
    """ValueError naming the unknown keywords unless `factory` accepts all of kwargs."""
    params = list(inspect.signature(factory).parameters.values())[1:]  # after num_classes
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        takes = f"keywords {', '.join(allowed)}" if allowed else "no keywords"
        raise ValueError(f"--model={name} takes {takes}; got unknown {', '.join(unknown)}")


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds a model by flag name: `MODELS.get(name)(num_classes, **kwargs)`.

    Args:
      name: the --model value: 'cnn', 'mlp', 'text_head' or a name registered in MODELS.
      num_classes: size of the logits.
      **kwargs: the factory's keywords: cnn(conv_impl=...), mlp(hidden=...),
        text_head(hidden=..., dropout=...).
    Raises:
      ValueError: unknown name (a registry ConfigError), num_classes < 1, unknown keyword, or a
        bad conv_impl / hidden.
    """
    factory = MODELS.get(name)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    _check_keywords(name, factory, kwargs)
    return factory(int(num_classes), **kwargs)


def make_apply_fn(model: nn.Module, compute_dtype: str = "float32"):
    """(params, x, rng=None) -> float32 logits; rng None: evaluation mode, a key: training mode.

    With compute_dtype bfloat16 the parameters and inputs are cast on the way in, so the
    forward and backward matmuls run in bfloat16 while the gradients reach the float32
    parameters (the cast's transpose)."""
    dropout = uses_dropout(model)
    dtype = jnp.dtype(compute_dtype)

    def apply_fn(params, x, rng=None):
        if dtype != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(dtype), params)
            x = jnp.asarray(x).astype(dtype)
        if rng is None or not dropout:
            logits = model.apply({"params": params}, x)
        else:
            logits = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
        return logits.astype(jnp.float32)

    return apply_fn


def train_flops_per_example(apply_fn, params, sample_input: jax.Array) -> float | None:
    """XLA's count of one example's forward + backward FLOPs (None where it reports none).
    sample_input: (1, ...)."""
    import optax

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    labels = jnp.zeros((1,), jnp.int32)
    cost = jax.jit(jax.grad(loss)).lower(params, sample_input[:1], labels).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = float((cost or {}).get("flops", 0.0))
    return flops if flops > 0 else None
