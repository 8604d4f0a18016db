"""Tests for marfl_jax.layers (and the benchmark-only lowerings of benchmarks.conv_variants):
every convolution lowering against XLA's convolution, the pools against flax's nn.max_pool, in
outputs and gradients."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from benchmarks import conv_variants
from marfl_jax import layers

# float32 tolerances: outputs are O(1); gradients are sums of up to ~10^4 float32 products.
RTOL, ATOL = 1e-5, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def _normal(seed, shape):
    """Standard-normal float32 test data from numpy (jax.random compiles slowly on this CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _jit_vjp(fn, primals, cotangent):
    """(fn(*primals), vjp(cotangent)) computed in one jitted call (eager autodiff is slow)."""

    def run(primals, cotangent):
        y, vjp = jax.vjp(fn, *primals)
        return y, vjp(cotangent)

    return jax.jit(run)(primals, cotangent)


def _lax_conv(x, k):
    dnums = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=dnums)


def test_kept_lowerings():
    assert layers.CONV_IMPLS == ("gather", "shift_concat", "lax")
    assert layers.DEFAULT_CONV_IMPL == "gather"


@pytest.mark.parametrize("impl", layers.CONV_IMPLS)
@pytest.mark.parametrize("cin,cout,kh,kw", [(1, 4, 3, 3), (3, 5, 3, 3), (2, 3, 2, 3)])
def test_conv_valid_matches_lax_conv(impl, cin, cout, kh, kw):
    x = _normal(1, (2, 7, 6, cin))
    k = _normal(2, (kh, kw, cin, cout))
    g = _normal(3, (2, 7 - kh + 1, 6 - kw + 1, cout))
    y_ref, d_ref = _jit_vjp(_lax_conv, (x, k), g)
    y, d = _jit_vjp(lambda a, b: layers.conv_valid(a, b, impl), (x, k), g)
    chex.assert_shape(y, y_ref.shape)
    chex.assert_trees_all_close(y, y_ref, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(d, d_ref, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("impl", ["shift_sum", "lax_patches"])
@pytest.mark.parametrize("cin,cout,kh,kw", [(1, 4, 3, 3), (3, 5, 3, 3), (2, 3, 2, 3)])
def test_benchmark_lowerings_match_lax_conv(impl, cin, cout, kh, kw):
    x = _normal(1, (2, 7, 6, cin))
    k = _normal(2, (kh, kw, cin, cout))
    g = _normal(3, (2, 7 - kh + 1, 6 - kw + 1, cout))
    y_ref, d_ref = _jit_vjp(_lax_conv, (x, k), g)
    y, d = _jit_vjp(conv_variants.CONV_LOWERINGS[impl], (x, k), g)
    chex.assert_trees_all_close(y, y_ref, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(d, d_ref, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_conv_valid_bad_impl_names_the_choices():
    with pytest.raises(ValueError, match=r"conv_impl.*'gather'.*'shift_concat'.*'lax'.*'fused'"):
        layers.conv_valid(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), "fused")


def test_im2col_gather_vjp_is_col2im():
    x = _normal(4, (2, 6, 5, 3))
    g = _normal(5, (2, 4, 3, 27))
    p, d = _jit_vjp(lambda a: layers.im2col_gather(a, 3, 3), (x,), g)
    p_ref, d_ref = _jit_vjp(lambda a: layers.im2col_slices(a, 3, 3), (x,), g)
    chex.assert_trees_all_equal(p, p_ref)
    chex.assert_trees_all_close(d, d_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("impl", conv_variants.POOL_IMPLS)
def test_max_pool_matches_flax(impl):
    # Integer-valued inputs: many exact ties inside windows.
    x = jnp.round(2 * _normal(6, (2, 8, 6, 3)))
    g = _normal(7, (2, 4, 3, 3))
    ref = lambda a: nn.max_pool(a, (2, 2), strides=(2, 2))  # noqa: E731
    y_ref, (d_ref,) = _jit_vjp(ref, (x,), g)
    y, (d,) = _jit_vjp(conv_variants.POOLS[impl], (x,), g)
    chex.assert_trees_all_equal(y, y_ref)
    if impl in ("first_max", "reduce_window"):  # same tie rule as select_and_scatter
        chex.assert_trees_all_equal(d, d_ref)
    else:  # ties split: same total per window
        sums = lambda d: d.reshape(2, 4, 2, 3, 2, 3).sum(axis=(2, 4))  # noqa: E731
        chex.assert_trees_all_close(sums(d), sums(d_ref), rtol=RTOL, atol=ATOL)
