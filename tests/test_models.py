"""Tests for marfl_jax.models: parameter counts, the CNN with every conv / pool lowering (the
package's and benchmarks.conv_variants') against flax's stock layers (outputs and gradients),
shapes, vmap over a peer axis, the model registry."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from benchmarks.conv_variants import POOL_IMPLS, VARIANT_CONV_IMPLS, VariantCNN
from marfl_jax import models
from marfl_jax.models import CNN, CONV_IMPLS, DEFAULT_CONV_IMPL, MLP, count_params, get_model

# float32 tolerances: outputs are O(1); gradients are sums of up to ~10^4 float32 products.
RTOL, ATOL = 1e-5, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def _normal(seed, shape):
    """Standard-normal float32 test data from numpy (jax.random compiles slowly on this CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _np_params(model, x, seed=0):
    """Random params of the right tree and shapes without compiling an init (numpy-filled)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree.map(fill, shapes)


def _mnist_like(seed, batch):
    """Images with exact-zero background (so pooling windows hold ties), values in [0, 1]."""
    rng = np.random.default_rng(seed)
    ink = rng.uniform(size=(batch, 28, 28, 1)).astype(np.float32)
    mask = rng.uniform(size=(batch, 28, 28, 1)) < 0.25
    return jnp.asarray(np.where(mask, ink, np.float32(0)))


def _params_with_positive_biases(params):
    """Params with random positive biases, so a zero background gives positive, tied values."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(123)
    new = []
    for path, leaf in leaves:
        if "bias" in jax.tree_util.keystr(path):
            leaf = jnp.asarray(rng.uniform(0.0, 0.2, leaf.shape), jnp.float32)
        new.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, new)


def _logits_and_grads(model, params, x, labels):
    """Jitted (logits, d loss / d params) for one model."""

    def run(p):
        return model.apply(p, x), jax.grad(lambda q: _loss(model, q, x, labels))(p)

    return jax.jit(run)(params)


def _loss(model, params, x, labels):
    logits = model.apply(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


@pytest.fixture(scope="module")
def cnn_params():
    """Default-CNN initial params, key 7 (compiling an init costs ~2 s here: share it)."""
    return jax.jit(CNN().init)(jax.random.key(7), jnp.zeros((1, 28, 28, 1)))


# ------------------------------------------------------------------------------------ counts


def test_cnn_param_count_is_papers(cnn_params):
    model = CNN(num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert count_params(shapes) == 1_199_882
    params = cnn_params
    assert count_params(params) == 1_199_882
    chex.assert_trees_all_equal_shapes(params, shapes)
    p = params["params"]
    chex.assert_shape(p["conv1"]["kernel"], (3, 3, 1, 32))
    chex.assert_shape(p["conv2"]["kernel"], (3, 3, 32, 64))
    chex.assert_shape(p["dense1"]["kernel"], (9216, 128))
    chex.assert_shape(p["dense2"]["kernel"], (128, 10))


def test_mlp_param_count():
    model = MLP(num_classes=10, hidden=(200,))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 784)))
    assert count_params(params) == 159_010  # 784*200 + 200 + 200*10 + 10
    two = jax.eval_shape(
        MLP(num_classes=10, hidden=(64, 32)).init, jax.random.key(0), jnp.zeros((1, 28, 28))
    )
    assert count_params(two) == 784 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert set(two["params"]) == {"dense1", "dense2", "dense3"}


def test_param_tree_and_init_identical_for_every_conv_impl(cnn_params):
    x = jnp.zeros((1, 28, 28, 1))
    ref = jax.eval_shape(VariantCNN(conv_impl="flax").init, jax.random.key(7), x)
    for model in [CNN(conv_impl=c) for c in CONV_IMPLS] + [
        VariantCNN(conv_impl=c) for c in VARIANT_CONV_IMPLS
    ]:
        got = jax.eval_shape(model.init, jax.random.key(7), x)
        chex.assert_trees_all_equal_shapes_and_dtypes(got, ref)
        assert jax.tree.structure(got) == jax.tree.structure(ref)
    # Same values too: nn.Conv and ConvParams draw from the same named RNG streams.
    flax_params = jax.jit(VariantCNN(conv_impl="flax").init)(jax.random.key(7), x)
    chex.assert_trees_all_equal(cnn_params, flax_params)


# ----------------------------------------------------------------------------- whole network


@pytest.fixture(scope="module")
def reference(cnn_params):
    """Stock flax network (nn.Conv, nn.max_pool), its params (positive biases), data, outputs."""
    model = VariantCNN(conv_impl="flax", pool_impl="reduce_window")
    x = _mnist_like(10, 3)
    labels = jnp.array([1, 7, 3])
    params = _params_with_positive_biases(cnn_params)
    logits, grads = _logits_and_grads(model, params, x, labels)
    return dict(params=params, x=x, labels=labels, logits=logits, grads=grads)


@pytest.mark.parametrize(
    "model",
    [CNN(conv_impl=c) for c in CONV_IMPLS] + [VariantCNN(conv_impl=c) for c in VARIANT_CONV_IMPLS],
    ids=lambda m: f"{type(m).__name__}-{m.conv_impl}",
)
def test_cnn_matches_stock_flax_outputs_and_grads(model, reference):
    r = reference
    logits, grads = _logits_and_grads(model, r["params"], r["x"], r["labels"])
    chex.assert_shape(logits, (3, 10))
    chex.assert_trees_all_close(logits, r["logits"], rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_equal_structs(grads, r["grads"])
    chex.assert_trees_all_close(grads, r["grads"], rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("pool_impl", POOL_IMPLS)
def test_cnn_pool_impls_match(pool_impl, reference):
    model = VariantCNN(conv_impl=DEFAULT_CONV_IMPL, pool_impl=pool_impl)
    r = reference
    logits, grads = _logits_and_grads(model, r["params"], r["x"], r["labels"])
    chex.assert_trees_all_close(logits, r["logits"], rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(grads, r["grads"], rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize(
    "model,x,out",
    [
        (CNN(num_classes=10), jnp.zeros((4, 28, 28, 1)), (4, 10)),
        (CNN(num_classes=20), jnp.zeros((2, 28, 28)), (2, 20)),
        (CNN(num_classes=10), jnp.zeros((2, 784)), (2, 10)),
        (MLP(num_classes=10), jnp.zeros((5, 28, 28, 1)), (5, 10)),
        (MLP(num_classes=20, hidden=(72,)), jnp.zeros((3, 768)), (3, 20)),
    ],
)
def test_output_shapes(model, x, out):
    params = jax.eval_shape(model.init, jax.random.key(0), x)  # abstract: no compile
    y = jax.eval_shape(model.apply, params, x)
    chex.assert_shape(y, out)
    chex.assert_type(y, jnp.float32)


@pytest.mark.parametrize("impl", [DEFAULT_CONV_IMPL, "lax"])
def test_vmap_over_peer_axis_of_stacked_params(impl, cnn_params):
    """The simulator's use: different params and data per peer, vmapped apply and grad."""
    model = CNN(conv_impl=impl)
    n_peers, batch = 3, 2
    x = _mnist_like(21, n_peers * batch).reshape(n_peers, batch, 28, 28, 1)
    labels = jnp.array([[0, 1], [2, 3], [4, 5]])
    # Different params per peer: the shared init plus per-peer noise.
    params = jax.tree.map(
        lambda a: a + 0.05 * _normal(a.size, (n_peers,) + a.shape),
        cnn_params,
    )
    chex.assert_tree_shape_prefix(params, (n_peers,))
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, xb, yb: _loss(model, p, xb, yb)))
    apply = jax.jit(model.apply)
    logits = jax.jit(jax.vmap(model.apply))(params, x)
    losses, grads = jax.jit(jax.vmap(loss_and_grad))(params, x, labels)
    chex.assert_shape(logits, (n_peers, batch, 10))
    for i in range(n_peers):
        p_i = jax.tree.map(lambda a, i=i: a[i], params)
        chex.assert_trees_all_close(logits[i], apply(p_i, x[i]), rtol=RTOL, atol=ATOL)
        l_i, g_i = loss_and_grad(p_i, x[i], labels[i])
        chex.assert_trees_all_close(losses[i], l_i, rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], grads), g_i, rtol=GRAD_RTOL, atol=GRAD_ATOL
        )


class ApplyVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("cnn", "mlp")
    def test_apply_jit_and_eager_agree(self, name):
        model = get_model(name, num_classes=10)
        x = _mnist_like(30, 2)
        params = _np_params(model, x, seed=31)
        expected = jax.jit(model.apply)(params, x)
        got = self.variant(model.apply)(params, x)
        chex.assert_shape(got, (2, 10))
        chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------- factory


def test_get_model():
    assert isinstance(get_model("cnn", 10), CNN)
    assert get_model("cnn", 10).conv_impl == DEFAULT_CONV_IMPL
    assert get_model("cnn", 10, conv_impl="lax").conv_impl == "lax"
    mlp = get_model("mlp", 20, hidden=[64, 32])
    assert isinstance(mlp, MLP) and mlp.hidden == (64, 32) and mlp.num_classes == 20


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("resnet", {}, r"--model='resnet'.*cnn, mlp, text_head"),
        ("cnn", {"conv_impl": "winograd"}, r"conv_impl.*'gather'.*'winograd'"),
        ("cnn", {"conv_impl": "flax"}, r"conv_impl.*'lax'.*'flax'"),  # benchmarks only
        ("cnn", {"hidden": (3,)}, r"--model=cnn takes keywords conv_impl; got unknown hidden"),
        ("mlp", {"dropout": 0.1}, r"--model=mlp.*unknown dropout"),
        ("mlp", {"hidden": (0,)}, r"hidden sizes"),
    ],
)
def test_get_model_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_model(name, 10, **kwargs)


def test_bad_conv_impl_on_module_raises():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="conv_impl"):
        jax.eval_shape(CNN(conv_impl="nope").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="conv_impl"):
        jax.eval_shape(CNN(conv_impl="fused").init, jax.random.key(0), x)  # benchmarks only
    with pytest.raises(ValueError, match="pool_impl"):
        jax.eval_shape(VariantCNN(pool_impl="avg").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="1 input channel"):
        jax.eval_shape(VariantCNN(conv_impl="fused").init, jax.random.key(0),
                       jnp.zeros((1, 28, 28, 3)))


def test_registry_lists_the_builtin_models():
    assert models.MODELS.names() == ("cnn", "mlp", "text_head")
    assert models.MODEL_NAMES == models.MODELS.names()
    assert isinstance(get_model("text_head", 20), models.TextHead)


def test_registered_model_is_built_by_get_model():
    class Tiny(nn.Module):
        num_classes: int
        width: int = 3

        @nn.compact
        def __call__(self, x):
            x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
            return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.width)(x)))

    @models.MODELS.register("tiny_test_model")
    def tiny(num_classes, *, width=3):
        return Tiny(num_classes=num_classes, width=width)

    try:
        model = get_model("tiny_test_model", 4, width=5)
        assert isinstance(model, Tiny) and model.width == 5 and model.num_classes == 4
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 6)))
        assert count_params(params) == 6 * 5 + 5 + 5 * 4 + 4
        with pytest.raises(ValueError, match="--model=tiny_test_model takes keywords width"):
            get_model("tiny_test_model", 4, depth=2)
        with pytest.raises(ValueError, match="already registered"):
            models.MODELS.register("tiny_test_model", tiny)
    finally:
        models.MODELS.unregister("tiny_test_model")
    assert "tiny_test_model" not in models.MODELS
    with pytest.raises(ValueError, match="--model='tiny_test_model'"):
        get_model("tiny_test_model", 4)


def test_count_params_on_arrays_and_shapes():
    tree = {"a": np.zeros((3, 4)), "b": [jnp.zeros(5), jax.ShapeDtypeStruct((2, 2), jnp.float32)]}
    assert count_params(tree) == 12 + 5 + 4
