"""Flax models of MAR-FL: the paper's MNIST CNN and an MLP.

Every model is a plain flax.linen module: `params = model.init(key, x)`, `model.apply(params, x)`.
The simulator stacks N peers' params on a leading peer axis and trains them with
`jax.vmap(loss_and_grad)`, so what matters here is the speed of the *vmapped* step.

Convolution formulation (`CNN.conv_impl`). All share one params tree -- conv kernels (3,3,Cin,Cout)
HWIO and biases (Cout,), exactly as nn.Conv declares them, with the same initial values -- and all
are tested against `lax.conv_general_dilated` and stock flax in outputs and gradients:

  gather        (DEFAULT) im2col + one matmul. The 3x3xC patches of a whole batch are ONE XLA
                gather of contiguous (3, 3*C) windows of the (H, W*C)-flattened input, which
                XLA:CPU emits as a single loop fusion with the producer (conv1's bias + ReLU)
                fused in; its VJP is a custom col2im (sum of 9 pads, one fusion) instead of a
                scatter-add. conv1 (Cin=1) uses the same path (a K=9 matmul).
  shift_concat  im2col by 9 shifted slices + concatenate, one matmul. XLA:CPU does not fuse the
                concatenate with its operands: 9 slice fusions, then a copy.
  shift_sum     9 accumulated matmuls with K=Cin (elementwise FMAs when Cin=1).
  fused         conv1 folded into conv2's im2col: one K=25 matmul writes conv2's patches
                directly (no col2im for conv1), at +21 % FLOPs; that skinny matmul is slow.
  lax_patches   lax.conv_general_dilated_patches + matmul (the patches are a convolution too).
  lax           lax.conv_general_dilated. Vmapped over peers with different kernels, jax's
                batching rule folds the peer axis into the channels: ONE grouped convolution
                (feature_group_count=N), which XLA:CPU runs at ~7 % of the matmul peak.
  flax          nn.Conv layers (the same XLA grouped convolution), bias and ReLU before pooling.

All but `flax` add conv2's bias and ReLU after pooling (exact: max(z+b) = max(z)+b, and ReLU is
monotone), on a 4x smaller tensor. Pooling (`CNN.pool_impl`, default `first_max`) takes the max of
the four strided sub-grids with a custom VJP that routes each window's gradient to its first
maximum in one fused pass: the same gradient as nn.max_pool (XLA select_and_scatter), ties
included -- MNIST's zero background makes ties common.

Measured with benchmarks/conv_lowering.py (one jitted, vmapped SGD step: forward + backward +
update, B=62 examples per peer, interleaved repeats, median) on a 2-core AMD EPYC (Zen 4) VM with no
GPU; float32 jnp.dot peak measured in the same runs: 196 (N=16) and 206 (N=64) GFLOP/s, not the
420-490 that DESIGN.md quotes; model FLOPs: 72.0 MFLOP per training example.
N=16: `--num_peers=16 --batch_size=62 --repeats=5`; N=64: `--num_peers=64 --repeats=3`, all impls.

  conv_impl       N=16: s/step  GFLOP/s  %peak  vs flax  |  N=64: s/step  GFLOP/s  %peak  vs flax
  gather                1.43     49.9    25.4    3.67x   |        5.25     54.4    26.4    3.28x
  shift_concat          1.51     47.3    24.1    3.47x   |        5.73     49.8    24.2    3.01x
  fused                 2.05     34.8    17.7    2.56x   |        8.18     34.9    17.0    2.11x
  lax                   4.73     15.1     7.7    1.11x   |       15.99     17.9     8.7    1.08x
  lax_patches           4.68     15.3     7.8    1.12x   |       18.75     15.2     7.4    0.92x
  flax                  5.25     13.6     6.9    1.00x   |       17.25     16.6     8.0    1.00x
  shift_sum             5.45     13.1     6.7    0.96x   |       22.45     12.7     6.2    0.77x
  stock flax (nn.Conv + nn.max_pool): N=64 20.88 s (0.83x); N=16 within noise of `flax`.

Run-to-run spread on this shared VM is about +-15 % (gather at N=16: 1.21-1.56 s over runs);
ratios within one run are steadier. `gather` is the default because it was the fastest, or tied,
in every configuration measured. gather vs shift_concat in s/step at N=64: plain vmap 5.03 vs
5.00 (a tie in that run), with the allocator settings below 2.94 vs 3.30, under `lax.map` over
chunks of 8 vmapped peers 3.53 vs 4.29, both 3.01 vs 3.32; at N=16 with the allocator settings
0.91 vs 1.07 (flax 3.07). `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot` speeds nn.Conv
3x (N=16: 1.94 s) but not gather (1.51 s). XLA's grouped convolution inside a loop is
pathological (flax under `lax.map` over chunks of 8 peers at N=64: 193 s/step), so never
`lax.map` over peers with conv_impl 'flax' or 'lax'.

Outside this module, two process-level settings matter as much as the lowering (with `gather`):
(1) XLA:CPU maps a fresh temp arena (~1.7 GB at N=16) for every step and the kernel zero-fills it
again each time (~1 s of system CPU per step at N=16). Starting Python with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=100000000000 (one string) keeps the heap mapped: N=16 1.56 -> 0.91 s,
N=64 5.03 -> 2.94 s per step (97 GFLOP/s, 49 % of peak). (2) Without (1), `lax.map` over chunks
of vmapped peers shrinks that arena: N=64 5.03 -> 3.53 s with chunks of 8 (chunks of 1, 2, 4 or 8
all gave 3.6-4.0 s in another run; 16 gave 4.6 s); with (1) as well: 3.01 s, no further gain.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MODEL_NAMES = ("cnn", "mlp", "text_head")

CONV_IMPLS = ("gather", "shift_concat", "shift_sum", "fused", "lax_patches", "lax", "flax")
DEFAULT_CONV_IMPL = "gather"

POOL_IMPLS = ("first_max", "slices", "reshape", "reduce_window")
DEFAULT_POOL_IMPL = "first_max"


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


# --------------------------------------------------------------------------------------------
# im2col: patches of a VALID, stride-1 kh x kw window, features ordered (i, j, c) like HWIO.
# --------------------------------------------------------------------------------------------


def _im2col_slices(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """(B, H, W, C) -> (B, Ho, Wo, kh*kw*C) by kh*kw shifted slices + one concatenate."""
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


def _im2col_gather_fwd_impl(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """(B, H, W, C) -> (B, Ho, Wo, kh*kw*C) as ONE gather of (kh, kw*C) windows.

    With the (W, C) axes flattened, the window of output pixel (h, w) is kh contiguous runs of
    kw*C floats starting at rows h..h+kh-1, offset w*C: a single XLA gather whose slices are
    contiguous, which XLA:CPU emits as one loop fusion (producers such as bias + ReLU fuse in).
    """
    b, h, w, c = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    xf = x.reshape(b, h, w * c)
    starts = np.stack(np.meshgrid(np.arange(ho), np.arange(wo) * c, indexing="ij"), axis=-1)
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(0, 3, 4), collapsed_slice_dims=(), start_index_map=(1, 2)
    )
    p = lax.gather(
        xf,
        jnp.asarray(starts, jnp.int32),
        dnums,
        slice_sizes=(b, kh, kw * c),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return p.reshape(b, ho, wo, kh * kw * c)


def _col2im(dp: jax.Array, kh: int, kw: int) -> jax.Array:
    """Adjoint of im2col: (B, Ho, Wo, kh*kw*C) -> (B, Ho+kh-1, Wo+kw-1, C) (sum of pads)."""
    c = dp.shape[-1] // (kh * kw)
    out = None
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            term = jnp.pad(
                dp[..., k * c : (k + 1) * c], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0))
            )
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def im2col_gather(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """Patches (B, Ho, Wo, kh*kw*C) of x (B, H, W, C); gather forward, pad-sum backward.

    The custom VJP replaces the gather's transpose (an XLA scatter-add, slow on CPU) by the
    fused sum of kh*kw padded slices.
    """
    return _im2col_gather_fwd_impl(x, kh, kw)


def _im2col_gather_fwd(x, kh, kw):
    return _im2col_gather_fwd_impl(x, kh, kw), None


def _im2col_gather_bwd(kh, kw, _, dp):
    return (_col2im(dp, kh, kw),)


im2col_gather.defvjp(_im2col_gather_fwd, _im2col_gather_bwd)


def conv_valid(x: jax.Array, kernel: jax.Array, impl: str = DEFAULT_CONV_IMPL) -> jax.Array:
    """VALID, stride-1 2-D convolution without bias, NHWC / HWIO.

    Args:
      x: (B, H, W, Cin) float32.
      kernel: (kh, kw, Cin, Cout).
      impl: one of CONV_IMPLS except 'fused' ('flax' here means the same XLA convolution as 'lax').
    Returns:
      (B, H-kh+1, W-kw+1, Cout).
    """
    kh, kw, cin, cout = kernel.shape
    if impl in ("lax", "flax"):
        return lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    if impl == "gather":
        return jnp.dot(im2col_gather(x, kh, kw), kernel.reshape(kh * kw * cin, cout))
    if impl == "shift_concat":
        return jnp.dot(_im2col_slices(x, kh, kw), kernel.reshape(kh * kw * cin, cout))
    if impl == "lax_patches":
        # Features come out channel-major (c, i, j): reorder the kernel to match.
        patches = lax.conv_general_dilated_patches(
            x, (kh, kw), (1, 1), "VALID", dimension_numbers=("NHWC", "OIHW", "NHWC")
        )
        return jnp.dot(patches, jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout))
    if impl == "shift_sum":
        # kh*kw accumulated matmuls with K = Cin (an elementwise FMA when Cin == 1).
        ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
        y = None
        for i in range(kh):
            for j in range(kw):
                s = x[:, i : i + ho, j : j + wo, :]
                t = s * kernel[i, j, 0] if cin == 1 else jnp.dot(s, kernel[i, j])
                y = t if y is None else y + t
        return y
    _check_choice(impl, [c for c in CONV_IMPLS if c != "fused"], "conv_impl")
    raise AssertionError("unreachable")


def _fused_conv1_matrix(k1: jax.Array) -> jax.Array:
    """conv1 kernel (3,3,1,C1) -> (25, 9*C1): maps a 5x5 input window to conv1's 3x3 outputs."""
    t = np.zeros((5, 5, 3, 3, 3, 3), np.float32)
    for i in range(3):
        for j in range(3):
            for a in range(3):
                for b in range(3):
                    t[i + a, j + b, i, j, a, b] = 1.0
    c1 = k1.shape[-1]
    return jnp.einsum("uvijab,abc->uvijc", t, k1[:, :, 0, :]).reshape(25, 9 * c1)


def _pool_slices(x: jax.Array) -> jax.Array:
    return jnp.maximum(
        jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
        jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]),
    )


@jax.custom_vjp
def _pool_first_max(x: jax.Array) -> jax.Array:
    return _pool_slices(x)


def _pool_first_max_fwd(x):
    y = _pool_slices(x)
    return y, (x, y)


def _pool_first_max_bwd(res, g):
    # The gradient goes to the FIRST maximum of each window in row-major order -- the rule of
    # XLA's select_and_scatter, i.e. of nn.max_pool's gradient -- computed as one elementwise
    # pass over the window-shaped input (no scatter, no tie-count reduction).
    x, y = res
    b, h, w, c = x.shape
    xr = x.reshape(b, h // 2, 2, w // 2, 2, c)
    yb = y[:, :, None, :, None, :]
    e00 = xr[:, :, 0:1, :, 0:1, :] == yb
    e01 = xr[:, :, 0:1, :, 1:2, :] == yb
    e10 = xr[:, :, 1:2, :, 0:1, :] == yb
    row = lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 2)
    col = lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 4)
    earlier = jnp.where(
        row == 0,
        (col == 1) & e00,
        e00 | e01 | ((col == 1) & e10),
    )
    dx = jnp.where((xr == yb) & ~earlier, g[:, :, None, :, None, :], 0.0)
    return (dx.astype(x.dtype).reshape(b, h, w, c),)


_pool_first_max.defvjp(_pool_first_max_fwd, _pool_first_max_bwd)


def max_pool_2x2(x: jax.Array, impl: str = DEFAULT_POOL_IMPL) -> jax.Array:
    """2x2 max pool, stride 2, VALID: (B, H, W, C) -> (B, H//2, W//2, C); H, W even.

    'first_max' (default): max of the four strided sub-grids, with a custom VJP that sends each
    window's gradient to its first maximum (row-major) in one fused elementwise pass -- the same
    gradient as nn.max_pool's, ties included. 'slices': the same forward, autodiff gradient
    (ties split evenly). 'reshape': reshape + max (ties split evenly). 'reduce_window': flax
    nn.max_pool (XLA reduce_window / select_and_scatter, slow vmapped on CPU).
    """
    if impl == "first_max":
        return _pool_first_max(x)
    if impl == "slices":
        return _pool_slices(x)
    if impl == "reshape":
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    if impl == "reduce_window":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    _check_choice(impl, POOL_IMPLS, "pool_impl")
    raise AssertionError("unreachable")


class ConvParams(nn.Module):
    """Declares a 3x3 conv's parameters exactly as nn.Conv does: kernel (3,3,Cin,Cout), bias."""

    features: int

    @nn.compact
    def __call__(self, cin: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return kernel, bias


def _as_images(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
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
    pool_impl: str = DEFAULT_POOL_IMPL

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_choice(self.conv_impl, CONV_IMPLS, "conv_impl")
        _check_choice(self.pool_impl, POOL_IMPLS, "pool_impl")
        x = _as_images(x)
        if self.conv_impl == "flax":
            # Stock flax: bias inside the conv, ReLU, then pool.
            x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))
            x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))
            x = max_pool_2x2(x, self.pool_impl)
        else:
            k1, b1 = ConvParams(32, name="conv1")(x.shape[-1])
            k2, b2 = ConvParams(64, name="conv2")(32)
            if self.conv_impl == "fused":
                if x.shape[-1] != 1:
                    raise ValueError(f"conv_impl='fused' needs 1 input channel; got {x.shape}")
                # conv1 folded into conv2's im2col: one K=25 matmul writes conv2's patches.
                p2 = nn.relu(
                    jnp.dot(im2col_gather(x, 5, 5), _fused_conv1_matrix(k1)) + jnp.tile(b1, 9)
                )
                z = jnp.dot(p2, k2.reshape(9 * 32, 64))
            else:
                h = nn.relu(conv_valid(x, k1, self.conv_impl) + b1)
                z = conv_valid(h, k2, self.conv_impl)
            # max(z + b) == max(z) + b and relu(max) == max(relu) exactly (monotone maps), so
            # pooling first moves conv2's bias add and ReLU onto a 4x smaller tensor.
            x = nn.relu(max_pool_2x2(z, self.pool_impl) + b2)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="dense1")(x))
        return nn.Dense(self.num_classes, name="dense2")(x)


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
        x = jnp.asarray(x, jnp.float32)
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
        x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.hidden, name="dense1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="dense2")(x)


def uses_dropout(model: nn.Module) -> bool:
    """Whether the model's training forward pass needs a `dropout` PRNG key."""
    return isinstance(model, TextHead) and model.dropout > 0


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds a model by flag name.

    Args:
      name: the --model value: 'cnn', 'mlp' or 'text_head'.
      num_classes: size of the logits.
      **kwargs: module attributes: CNN(conv_impl=..., pool_impl=...), MLP(hidden=...),
        TextHead(hidden=..., dropout=...).
    Raises:
      ValueError: unknown name, unknown keyword, or a bad conv_impl / pool_impl / hidden.
    """
    if name not in MODEL_NAMES:
        raise ValueError(
            f"--model must be one of {', '.join(map(repr, MODEL_NAMES))}; got {name!r}"
        )
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    cls = {"cnn": CNN, "mlp": MLP, "text_head": TextHead}[name]
    allowed = {"cnn": ("conv_impl", "pool_impl"), "mlp": ("hidden",),
               "text_head": ("hidden", "dropout")}[name]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"--model={name} takes keywords {', '.join(allowed)}; got unknown {', '.join(unknown)}"
        )
    if name == "cnn":
        _check_choice(kwargs.get("conv_impl", DEFAULT_CONV_IMPL), CONV_IMPLS, "conv_impl")
        _check_choice(kwargs.get("pool_impl", DEFAULT_POOL_IMPL), POOL_IMPLS, "pool_impl")
    elif name == "text_head":
        pass
    else:
        hidden = tuple(int(h) for h in kwargs.get("hidden", (200,)))
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be >= 1; got {hidden}")
        kwargs["hidden"] = hidden
    return cls(num_classes=int(num_classes), **kwargs)


def count_params(params: Any) -> int:
    """Total number of scalars in a (single-peer) params pytree; works on ShapeDtypeStructs."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
