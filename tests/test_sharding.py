"""The one home of sharding (xllava_jax/sharding.py) on 8 fake CPU devices: the rules as data, the
parameters' and the optimizer state's shardings from their metadata, and the shardings XLA gives the
activations inside a layer once the models constrain them, so a typo in the rules fails here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from xllava_jax import sharding
from xllava_jax.config import ModelConfig
from xllava_jax.models.xllava import XLlava

BATCH = ("data", "fsdp")
TINY = ModelConfig.tiny()


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def test_rules_are_data_a_config_overrides():
    rules = sharding.make_rules({"embed": "tensor", "act_batch": "data", "mlp": ""})
    assert rules["embed"] == "tensor" and rules["act_batch"] == "data" and rules["mlp"] is None
    assert rules["heads"] == sharding.DEFAULT_RULES["heads"]
    assert sharding.make_rules({"act_batch": "data+fsdp"})["act_batch"] == BATCH
    with pytest.raises(ValueError, match=r"mesh.rules.embd: no such logical axis"):
        sharding.make_rules({"embd": "fsdp"})
    with pytest.raises(ValueError, match=r"mesh.rules.embed: unknown mesh axis 'fdsp'"):
        sharding.make_rules({"embed": "fdsp"})


def test_logical_to_spec_uses_each_mesh_axis_once_and_only_where_it_divides():
    shape = {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.logical_to_spec(("act_batch", "act_length", "act_heads", None), (8, 5, 4, 3), shape) == \
        P(BATCH, None, "tensor", None)
    assert sharding.logical_to_spec(("act_batch", "act_embed"), (6, 8), shape) == P(None, None)  # 6 % 4
    assert sharding.logical_to_spec(("embed", "embed"), (8, 8), shape) == P("fsdp", None)
    assert sharding.logical_to_spec(("act_batch",), (8,), {"data": 1, "fsdp": 8, "tensor": 1}) == P("fsdp")


def test_make_mesh_over_any_devices():
    mesh = sharding.make_mesh((1, -1, 2), jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.devices()[:4]}
    with pytest.raises(ValueError, match="needs 6 devices, 8 present"):
        sharding.make_mesh((3, 2, 1))


@pytest.mark.parametrize("scan", [False, True])
def test_parameter_and_optimizer_state_shardings_come_from_metadata(scan):
    mesh = sharding.make_mesh((2, 2, 2))
    model = nnx.eval_shape(lambda: XLlava(TINY.replace(scan_layers=scan), rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    specs = {_dotted(p): s.spec for p, s in
             jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(sharding.state_shardings(state, mesh)))[0]}
    layer = "language_model.layers." + ("" if scan else "0.")
    lead = (None,) if scan else ()
    assert specs[layer + "self_attn.q_proj.kernel"] == P(*lead, "fsdp", "tensor")
    assert specs[layer + "mlp.down_proj.kernel"] == P(*lead, "tensor", "fsdp")
    assert specs[layer + "input_layernorm.scale"] == P(*lead, None)
    assert specs["language_model.embed_tokens.embedding"] == P("tensor", "fsdp")
    vision = "vision_tower.layers." + ("" if scan else "0.")
    assert specs[vision + "mlp.fc1.kernel"] == P(*lead, "fsdp", "tensor")
    # Adam's moments (inside a per-group multi_transform) take their parameter's sharding
    params = nnx.to_pure_dict(state)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
    labels = jax.tree.map(lambda x: "a" if x.ndim > 1 else "b", params)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.multi_transform({"a": optax.adamw(1e-3), "b": optax.adamw(1e-4)}, labels))
    opt = sharding.opt_state_shardings(tx, params, param_sh, mesh)
    moments = [s.inner_state[0] for s in opt[1].inner_states.values()]
    for adam in moments:
        for moment in (adam.mu, adam.nu):
            flat = jax.tree_util.tree_flatten_with_path(moment)[0]
            assert flat, "no moment leaves"
            for path, leaf in flat:
                key = _dotted(path)
                assert leaf.spec == specs[key], key
        assert adam.count.spec == P()


def _recorded_activations(monkeypatch, scan: bool, rules=None) -> dict[tuple, set]:
    """Run a sharded forward + backward of the tiny model and record, for each logical layout the
    models constrain, the PartitionSpecs XLA chose for those activations."""
    seen: dict[tuple, set] = {}
    original = sharding.shard

    def recording(x, axes):
        y = original(x, axes)
        def record(s, axes=tuple(axes), ndim=y.ndim):  # specs come without their trailing Nones
            seen.setdefault(axes, set()).add(tuple(s.spec) + (None,) * (ndim - len(s.spec)))

        jax.debug.inspect_array_sharding(y, callback=record)
        return y

    monkeypatch.setattr(sharding, "shard", recording)
    mesh = sharding.make_mesh((2, 2, 2))
    cfg = TINY.replace(scan_layers=scan, attention="xla")
    model = XLlava(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.device_put(params, sharding.state_shardings(params, mesh))
    n = cfg.num_image_tokens
    ids = jnp.asarray(np.tile([[1] + [cfg.image_token_id] * n + list(range(3, 19))], (8, 1)))
    pixels = jnp.zeros((8, 1, 32, 32, 3))

    def loss(p, ids, pixels):
        return nnx.merge(graphdef, p)(ids, pixels).astype(jnp.float32).sum()

    batch_sh = sharding.batch_sharding(mesh, None, 2)
    with jax.set_mesh(mesh), sharding.activation_rules(rules):
        jax.jit(jax.grad(loss)).lower(params, jax.device_put(ids, batch_sh),
                                      jax.device_put(pixels, sharding.batch_sharding(mesh, None, 5))).compile()
    return seen


@pytest.mark.parametrize("scan", [False, True])
def test_activations_inside_a_layer_are_sharded_as_the_rules_say(monkeypatch, scan):
    seen = _recorded_activations(monkeypatch, scan)
    assert seen[sharding.HIDDEN] == {(BATCH, None, None)}
    assert seen[sharding.HEADS] == {(BATCH, None, "tensor", None)}
    assert seen[sharding.KV_HEADS] == {(BATCH, None, "tensor", None)}
    assert seen[sharding.MLP] == {(BATCH, None, "tensor")}
    assert seen[sharding.LOGITS] == {(BATCH, None, "tensor")}


def test_a_rule_change_moves_the_activations(monkeypatch):
    rules = sharding.make_rules({"act_batch": "data", "act_mlp": ""})
    seen = _recorded_activations(monkeypatch, False, rules)
    assert seen[sharding.HIDDEN] == {("data", None, None)}
    assert seen[sharding.MLP] == {("data", None, None)}


def test_without_rules_nothing_is_constrained():
    x = jnp.ones((8, 4))
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh):
        assert sharding.activation_spec(sharding.BATCH, x.shape) is None
        with sharding.activation_rules():
            assert sharding.activation_spec(("act_batch", None), x.shape) == P(BATCH, None)
    with sharding.activation_rules():
        assert sharding.activation_spec(("act_batch", None), x.shape) is None  # no mesh
