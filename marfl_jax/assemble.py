"""One run's pieces from its Config, each built once, in one pass and in order.

    assemble(config, workdir, previous) -> Run

data -> plan -> model -> algorithm, wire, codec, rule, adversary -> ledger -> clock ->
accountant -> Simulation -> state shapes -> compiled steps (refusing a run that would not fit).

This is the one module that reads the Config to build pieces: everything below it receives
plain arguments or its own small settings record (`config.settings(Kind)` for a NamedTuple
whose fields are Config fields, or a record built here: the rule's and the attack's `Params`,
the `ChurnModel`, MKD's `Distillation`, DP's `Privacy`). `marfl_jax.runner` keeps the loop.
`pieces` is the part without data, plan or compilation, for code that drives its own loop
(tests, benchmarks).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from marfl_jax import (
    accounting,
    adversary,
    algorithms,
    asynchronous,
    attacks,
    churn,
    clock,
    comm,
    dp,
    local,
    memory,
    mkd,
    models,
    network,
    rules,
    sharding,
)
from marfl_jax import codec as codec_lib
from marfl_jax import data as data_lib
from marfl_jax import plan as plan_lib
from marfl_jax import workdir as files
from marfl_jax.config import Config, ConfigError
from marfl_jax.core import (
    DeviceData,
    FLState,
    Simulation,
    init_state,
    initial_stage_states,
    make_iteration,
)
from marfl_jax.core import replica_axis as replicas_lib

# What every algorithm averages: weights and momentum (DP adds the smoothed update).
STATE_PAYLOADS = 2


# -- Settings records: the Config's flags as each piece reads them. -------------------------

def algorithm(config: Config) -> algorithms.Algorithm:
    """The run's aggregation algorithm (`--algorithm` and its settings)."""
    return algorithms.make_algorithm(config.settings(algorithms.Settings))


def rule_params(config: Config, run_algorithm: algorithms.Algorithm | None = None
                ) -> rules.Params:
    """--aggregator_f (resolved for the algorithm's largest group: `Config.tolerated_f`),
    --clip_tau, --clip_iterations. run_algorithm: the run's (default: made from the config)."""
    largest = (run_algorithm or algorithm(config)).max_group_size
    return rules.Params(config.tolerated_f(largest), float(config.clip_tau),
                        int(config.clip_iterations))


def report_rule(config: Config, run_algorithm: algorithms.Algorithm) -> None:
    """Logs the f a rule that reads it gets (info) and, in one warning line naming the flag to
    set, a rule whose params make it exactly the group mean (`rules.Rule.equals_mean`). Nothing
    for --aggregator=mean."""
    rule, params = rules.RULES.get(config.aggregator), rule_params(config, run_algorithm)
    if rule.exact_mean:
        return
    largest = run_algorithm.max_group_size
    if rule.honest_majority:
        logging.info("--aggregator=%s tolerates f = %d Byzantine copies per group "
                     "(--aggregator_f=%s, groups of at most %d)", config.aggregator, params.f,
                     config.aggregator_f, largest)
    if not rule.equals_mean(params, largest):
        return
    helps = [f for f in range(1, (largest - 1) // 2 + 1)
             if not rule.equals_mean(params._replace(f=f), largest)]
    fix = (f"set --aggregator_f to {helps[0]}" + (f"..{helps[-1]}" if len(helps) > 1 else "")
           if helps else ("no --aggregator_f changes that; " if rule.honest_majority else "")
           + "choose another --aggregator or larger groups")
    why = (f"f = {params.f} from --aggregator_f={config.aggregator_f}, "
           if rule.honest_majority else "")
    logging.warning("--aggregator=%s is exactly the group mean here (%sgroups of at most %d "
                    "with --algorithm=%s): %s", config.aggregator, why, largest,
                    config.algorithm, fix)


def attack_params(config: Config) -> attacks.Params:
    """--attack_sigma, --attack_tau."""
    return attacks.Params(float(config.attack_sigma), float(config.attack_tau))


def churn_model(config: Config) -> churn.ChurnModel:
    """Participation, dropout and availability (--update_fraction ... --mean_off_iterations)."""
    return churn.ChurnModel(config.update_fraction, config.aggregate_fraction, config.dropout,
                            config.dropout_timing, config.availability,
                            config.mean_on_iterations, config.mean_off_iterations)


def distillation(config: Config) -> mkd.Distillation | None:
    """MKD's settings, or None when --mkd is off. Under DP the CE term is dropped (the authors:
    it would leak the labels past the noise)."""
    if not config.mkd:
        return None
    return mkd.Distillation(config.mkd_iterations, config.mkd_temperature,
                            config.mkd_teacher_fraction, config.mkd_batches,
                            blend=not config.mkd_no_blending, include_ce=not config.dp)


def privacy(config: Config) -> dp.Privacy | None:
    """DP's settings, or None when --dp is off."""
    if not config.dp:
        return None
    return dp.Privacy(config.dp_noise_multiplier, config.dp_initial_clip,
                      config.dp_target_quantile, config.dp_clip_lr, config.dp_server_lr,
                      config.dp_server_momentum, config.aggregating_peers,
                      split_on_aggregating=config.dp_noise_peers == "aggregating")


def make_adversary(config: Config, num_classes: int) -> adversary.Adversary | None:
    """The run's Byzantine peers (`--byzantine_fraction`), or None."""
    if not config.byzantine_fraction:
        return None
    return adversary.Adversary(
        adversary.pool(config.num_peers, config.byzantine_fraction, config.seed),
        attacks.get(config.attack), attack_params(config), config.byzantine_placement,
        num_classes)


def make_ledger(run_algorithm: algorithms.Algorithm, payload_bytes: int, *,
                private: bool = False, share_momentum: bool = True) -> comm.Ledger:
    """payload_bytes: one model-sized payload as encoded on the wire; private: DP's third
    payload and its clip indicator; share_momentum: messages carry the momentum too."""
    return comm.Ledger(payload_bytes=payload_bytes,
                       payloads_per_message=STATE_PAYLOADS - (not share_momentum) + private,
                       wire=run_algorithm.wire,
                       metadata_record_bytes=run_algorithm.metadata_record_bytes,
                       scalar_bytes=4 if private else 0)  # DP's clip indicator.


def make_clock(config: Config, run_algorithm: algorithms.Algorithm, ledger: comm.Ledger,
               flops_per_example) -> clock.Clock | None:
    """The simulated clock of `--network` (None for 'none'; the wire's timing was checked at
    validation). flops_per_example: () -> FLOPs of one training example, called only for a
    trace with a gflops column."""
    if config.network == "none":
        return None
    links = network.make_links(config.settings(network.Settings), flops_per_example)
    if links is None:
        return None
    return clock.Clock(
        links=clock.Links(*(jnp.asarray(x) for x in links)),
        wire=comm.get_wire(run_algorithm.wire),
        message_bytes=float(ledger.payloads_per_message * ledger.payload_bytes
                            + ledger.scalar_bytes),
        distill_message_bytes=float(ledger.payload_bytes),
        server_bps=config.server_mbps * clock.MBIT, timeout_s=config.round_timeout_s,
        examples=config.local_batches * config.batch_size,
        barriers_per_round=run_algorithm.barriers_per_round)


# -- The simulation's pieces. -----------------------------------------------------------------

class Pieces(NamedTuple):
    """What the iterations are built from, each made once (`pieces`)."""

    sim: Simulation
    ledger: comm.Ledger
    accountant: accounting.PrivacyAccountant | None
    one_peer: Any  # One peer's params as ShapeDtypeStructs.
    model: Any  # The flax module every peer runs.


def pieces(config: Config, model, sample_input: jax.Array, mesh=None,
           peer_chunk: int | None = None) -> Pieces:
    """The simulation with its clock, the ledger and the privacy accountant, in one pass: one
    peer's parameter shapes give the payload as encoded on the wire, the payload the ledger,
    the ledger the clock's message sizes, and the Simulation is made once, with its clock.

    sample_input: (1, ...) one input example (shapes only); peer_chunk: the plan's (default
    --peer_chunk)."""
    run_algorithm = algorithm(config)
    codec = codec_lib.CODECS.get(config.codec)
    one_peer = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_input)["params"])
    ledger = make_ledger(run_algorithm, codec_lib.tree_bytes(codec, one_peer, config.codec_block),
                         private=config.dp, share_momentum=config.share_momentum)
    apply_fn = models.make_apply_fn(model, config.compute_dtype)

    def flops_per_example():  # Only a trace with a gflops column asks.
        params = model.init(jax.random.key(0), sample_input)["params"]
        return models.train_flops_per_example(apply_fn, params, sample_input)

    num_classes = jax.eval_shape(apply_fn, one_peer, sample_input).shape[-1]
    sim = Simulation(
        apply_fn=apply_fn,
        optimizer=local.momentum_sgd(config.learning_rate, config.momentum),
        algorithm=run_algorithm, churn_model=churn_model(config),
        local_batches=config.local_batches, batch_size=config.batch_size,
        model_dropout=models.uses_dropout(model),
        peer_chunk=config.peer_chunk if peer_chunk is None else peer_chunk,
        distillation=distillation(config), privacy=privacy(config), mesh=mesh,
        clock=make_clock(config, run_algorithm, ledger, flops_per_example),
        roundtrip=(None if codec.lossless else
                   functools.partial(codec_lib.roundtrip_tree, codec, block=config.codec_block)),
        slice_unit=codec.unit(config.codec_block), share_momentum=config.share_momentum,
        aggregator=rules.get(config.aggregator, rule_params(config, run_algorithm)),
        adversary=make_adversary(config, num_classes))
    accountant = None if not config.dp else accounting.PrivacyAccountant(
        config.num_peers, config.dp_noise_multiplier, config.privacy_delta)
    return Pieces(sim, ledger, accountant, one_peer, model)


def simulation(config: Config, model, mesh=None) -> Simulation:
    """The Simulation of `config` for `model` (sample input: one MNIST image)."""
    features = getattr(data_lib.DATASETS.get(config.dataset), "inputs", "images") == "features"
    sample = jnp.zeros((1, config.feature_dim) if features else (1, 28, 28), jnp.float32)
    return pieces(config, model, sample, mesh).sim


# -- The whole run. -----------------------------------------------------------------------------

class Run(NamedTuple):
    """A run's pieces, each built once from its config (`assemble`)."""

    config: Config
    workdir: str
    plan: plan_lib.Plan
    mesh: Any  # The device mesh over the peer axis, or None on one device.
    model: Any  # The flax module every peer runs.
    sim: Simulation
    ledger: comm.Ledger  # With zero totals; the run's progress carries its own.
    accountant: accounting.PrivacyAccountant | None  # Likewise.
    data: DeviceData
    test_images: jax.Array  # (n_test, ...) float32.
    test_labels: jax.Array  # (n_test,) int32.
    abstract_state: FLState  # Shapes only (leaves (R, N, ...) with --replicas=R > 1).
    steps: Any  # `Steps`, `ReplicaSteps` (--replicas > 1) or `asynchronous.WaveSteps`.
    evaluate_peers: Any  # Jitted (params (K, ...), images, labels) -> (accuracy, loss) (K,).
    replica_inputs: replicas_lib.ReplicaInputs | None = None  # --replicas > 1: per replica.


def assemble(config: Config, workdir: str, previous) -> Run:
    """The data, the plan, the model and the simulation with its ledger and accountant; the
    iteration compiled for the state's shapes, refusing a run that would not fit. `previous`:
    the workdir's config of an earlier run (`workdir.previous_config`), or None."""
    report_rule(config, algorithm(config))  # Before any heavy work.
    # Data.
    dataset, data, test_images, test_labels = load_data(config)
    mesh = sharding.peer_mesh(config.num_peers)  # None on one device.
    if mesh is None and jax.process_count() > 1:
        raise ConfigError(f"--num_peers={config.num_peers} must be divisible by the "
                          f"{jax.device_count()} devices of a multi-process run")
    sample = test_images[:1]
    # Plan and model.
    chosen = execution_plan(config, workdir, previous, dataset.num_classes, sample, mesh)
    if mesh is not None:
        data = DeviceData(*sharding.replicate((data.x_train, data.y_train), mesh),
                          *sharding.shard_peers((data.table, data.counts), mesh))
        test_images, test_labels = sharding.replicate((test_images, test_labels), mesh)
        sample = test_images[:1]
    model = build_model(config, dataset.num_classes, chosen)
    # Algorithm, wire, codec, rule, adversary, ledger, clock, accountant: the Simulation.
    made = pieces(config, model, sample, mesh, peer_chunk=chosen.peer_chunk)
    sim = made.sim
    # State shapes and the compiled steps.
    abstract_state = jax.eval_shape(lambda: initial_state(config, model, sim, sample))
    inputs = None
    if config.replicas > 1:
        if mesh is not None:
            raise ConfigError(f"--replicas={config.replicas} runs on one device; this machine "
                              f"shards the peers over {mesh.size} (set CUDA_VISIBLE_DEVICES or "
                              "XLA_FLAGS to one device)")
        data = replica_data(config, dataset.y_train, data)
        inputs = replica_inputs(config, sim)
        steps = ReplicaSteps(sim, abstract_state, data, inputs, replica_seeds(config))
    elif config.asynchronous:
        if mesh is not None:
            raise ConfigError("--asynchronous runs on one device; this machine shards the peers "
                              f"over {mesh.size} (set CUDA_VISIBLE_DEVICES or "
                              "XLA_FLAGS to one device)")
        steps = asynchronous.WaveSteps(sim, abstract_state, data, config.seed,
                                       chosen.wave_layout)
    else:
        steps = Steps(sim, abstract_state, data, config.seed, mesh)
    run_algorithm = sim.algorithm
    logging.info("model %s: %d parameters, payload %d bytes; algorithm %s (%s): %d rounds%s%s",
                 config.model, models.count_params(made.one_peer), made.ledger.payload_bytes,
                 run_algorithm.name, run_algorithm.description, run_algorithm.num_rounds,
                 ", exact at full participation" if run_algorithm.exact else "",
                 f"; peers sharded over {mesh.size} devices" if mesh is not None else "")
    estimate = memory.MemoryEstimate(
        memory.tree_nbytes(abstract_state) // (mesh.size if mesh is not None else 1),
        memory.tree_nbytes((data, test_images, test_labels)),
        memory.step_bytes(steps.compiled(sim.distillation is not None)))
    logging.info("memory estimate: %s", estimate.describe())
    memory.check_fits(estimate, (int(config.memory_limit_gb * memory.GB)
                                 if config.memory_limit_gb else memory.available_bytes()),
                      num_peers=config.num_peers, peer_chunk=sim.peer_chunk)
    return Run(config, workdir, chosen, mesh, model, sim, made.ledger, made.accountant, data,
               test_images, test_labels, abstract_state, steps,
               jax.jit(functools.partial(local.evaluate_peers, apply_fn=sim.apply_fn)), inputs)


def load_data(config: Config):
    """The dataset, the peers' partition on the device, and the test set.

    Returns:
      (dataset, DeviceData, test images (n_test, ...) float32, test labels (n_test,) int32).
    """
    dataset = data_lib.load_dataset(
        config.dataset, config.data_dir or None, encoder=config.encoder,
        features=config.features, feature_dim=config.feature_dim,
        feature_cache=config.feature_cache or None)
    peer_index = partition(config, dataset.y_train, config.seed)
    data = DeviceData(jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train, jnp.int32),
                      jnp.asarray(peer_index.table), jnp.asarray(peer_index.counts))
    logging.info("data: %s; %d train / %d test examples; %d peers hold %d-%d examples",
                 dataset.source, len(dataset.y_train), len(dataset.y_test), config.num_peers,
                 peer_index.counts.min(), peer_index.counts.max())
    return (dataset, data, data_lib.preprocess(jnp.asarray(dataset.x_test)),
            jnp.asarray(dataset.y_test, jnp.int32))


def partition(config: Config, labels: np.ndarray, seed: int) -> data_lib.PeerIndex:
    """The peers' index tables of `--partition` drawn with `seed`."""
    try:
        return data_lib.partition(labels, config.num_peers, config.partition,
                                  config.dirichlet_alpha, seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def replica_seeds(config: Config) -> list[int]:
    """--seed + r for each of the --replicas replicas."""
    return [config.seed + r for r in range(config.replicas)]


def replica_data(config: Config, labels: np.ndarray, data: DeviceData) -> DeviceData:
    """`data` with each replica's partition: table (R, N, L) (padded with each row's first
    entry to the widest replica's L; the batches drawn are the same, `data.sampling`'s draw
    being a prefix of a longer one) and counts (R, N)."""
    indexes = [partition(config, labels, seed) for seed in replica_seeds(config)]
    width = max(index.table.shape[1] for index in indexes)
    tables = [np.concatenate([index.table, np.repeat(index.table[:, :1],
                                                     width - index.table.shape[1], axis=1)],
                             axis=1) for index in indexes]
    return data._replace(table=jnp.asarray(np.stack(tables)),
                         counts=jnp.asarray(np.stack([index.counts for index in indexes])))


def replica_inputs(config: Config, sim: Simulation) -> replicas_lib.ReplicaInputs:
    """Each replica's attackers and drawn links (None where the seed draws none)."""
    seeds = replica_seeds(config)
    byzantine = links = None
    if sim.adversary is not None:
        byzantine = jnp.asarray(np.stack([adversary.pool(
            config.num_peers, config.byzantine_fraction, seed) for seed in seeds]))
    if sim.clock is not None and config.network == "lognormal":  # The others draw nothing.
        drawn = [network.make_links(config.settings(network.Settings)._replace(seed=seed))
                 for seed in seeds]
        links = clock.Links(*(jnp.asarray(np.stack(leaf)) for leaf in zip(*drawn, strict=True)))
    return replicas_lib.ReplicaInputs(byzantine, links)


def build_model(config: Config, num_classes: int, chosen: plan_lib.Plan):
    """The run's model, with the plan's convolution lowering."""
    kwargs = {"conv_impl": chosen.conv_impl} if chosen.conv_impl else {}
    return models.get_model(config.model, num_classes, **kwargs)


def execution_plan(config: Config, workdir: str, previous, num_classes: int, sample_input,
                   mesh) -> plan_lib.Plan:
    """The plan this run keeps: the workdir's (a resumed run), the flags' (--plan=fixed, a
    sharded or short run), or the fastest measured now (`marfl_jax.plan`). The runner writes it
    to the workdir's plan.json once the run is known to fit."""
    path = os.path.join(workdir, "plan.json")
    stored = files.read_json(path) if previous is not None else None
    if stored is not None:
        chosen = plan_lib.Plan(**stored)
        logging.info("plan: %s (kept from %s)", chosen.describe(), path)
        return chosen
    # Replicas are more peers on the vectorized axes: R x N.
    request = config.settings(plan_lib.Request)._replace(
        num_peers=config.num_peers * config.replicas)
    chosen = plan_lib.fixed(request)
    peer_steps = request.num_peers * config.local_batches * config.max_iterations
    if previous is not None:  # A run from before plans existed ran the flags' plan.
        logging.info("plan: %s (the flags', as when this run started)", chosen.describe())
    elif config.plan == "auto" and mesh is None:
        device = jax.devices()[0]
        optimizer = local.momentum_sgd(config.learning_rate, config.momentum)

        def build_apply_fn(candidate):
            model = build_model(config, num_classes, candidate)
            params = model.init(jax.random.key(0), sample_input)["params"]
            return models.make_apply_fn(model, config.compute_dtype), params

        one_peer = jax.eval_shape(lambda: build_apply_fn(chosen)[1])
        state_bytes = request.num_peers * (memory.tree_nbytes(one_peer) + memory.tree_nbytes(
            jax.eval_shape(optimizer.init, one_peer)))
        make_step = plan_lib.local_step_factory(request, build_apply_fn, sample_input, optimizer,
                                                num_classes)
        chosen, _ = plan_lib.choose(
            request, make_step, backend=device.platform, device_kind=device.device_kind,
            input_shape=tuple(sample_input.shape[1:]), num_classes=num_classes,
            budget_s=config.plan_budget_s, log=logging.info, state_bytes=state_bytes,
            available_bytes=(int(config.memory_limit_gb * memory.GB) if config.memory_limit_gb
                             else memory.available_bytes(device)),
            time_candidates=peer_steps >= plan_lib.MIN_PEER_STEPS)
    else:
        logging.info("plan: %s (%s)", chosen.describe(), "--plan=fixed" if config.plan ==
                     "fixed" else "sharded run")
    if config.asynchronous and not chosen.wave_layout:
        chosen = chosen._replace(wave_layout=plan_lib.wave_layout(config.wave_layout,
                                                                  config.num_peers))
    return chosen


def initial_state(config: Config, model, sim: Simulation, sample_input: jax.Array,
                  mesh=None) -> FLState:
    """Iteration 0's state, every peer from the seed (sharded over `mesh`, if any); with
    --replicas=R > 1, the R replicas' states stacked (leaves (R, N, ...)), replica r's from
    seed + r."""
    states = [init_state(model, sim.optimizer, sample_input, config.num_peers,
                         jax.random.fold_in(jax.random.key(seed), 0), sim.churn_model,
                         functools.partial(initial_stage_states, sim))
              for seed in replica_seeds(config)]
    if config.replicas > 1:
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    return sharding.shard_peers(states[0], mesh)


class Steps:
    """The compiled iterations of a run, compiled once each for the state's shapes (MKD's
    variant takes lambda as a fourth argument), and the iterations' keys."""

    def __init__(self, sim: Simulation, abstract_state, data: DeviceData, seed: int, mesh=None):
        self._sim, self._abstract_state, self._data, self._mesh = sim, abstract_state, data, mesh
        self._iteration_key = jax.random.fold_in(jax.random.key(seed), 1)
        self._compiled = {}

    def key_at(self, t: int):
        """Iteration t's key, replicated over the mesh when there is one."""
        key = jax.random.fold_in(self._iteration_key, t)
        if self._mesh is None:
            return key
        return jax.random.wrap_key_data(sharding.replicate(jax.random.key_data(key),
                                                           self._mesh))

    def compiled(self, distilling: bool):
        if distilling not in self._compiled:
            step = jax.jit(make_iteration(self._sim, distilling), donate_argnums=0)
            weight = (jax.ShapeDtypeStruct((), jnp.float32),) if distilling else ()
            self._compiled[distilling] = step.lower(
                sharding.abstract_by_peer(self._abstract_state, self._mesh), self.key_at(0),
                self._data, *weight).compile()
        return self._compiled[distilling]

    def __call__(self, state: FLState, t: int) -> tuple[FLState, dict, bool]:
        """Runs iteration t: (the new state, its info, whether it distilled)."""
        distilling, weight = distillation_at(self._sim, t)
        state, info = self.compiled(distilling)(state, self.key_at(t), self._data, *weight)
        return state, info, distilling


def distillation_at(sim: Simulation, t: int) -> tuple[bool, tuple]:
    """Whether iteration t distils, and the compiled step's extra argument (MKD's weight)."""
    distillation_ = sim.distillation
    distilling = distillation_ is not None and distillation_.active(t)
    return distilling, (np.float32(distillation_.weight(t)),) if distilling else ()


class ReplicaSteps:
    """`Steps` for R replicas (`marfl_jax.core.replicas`): one compiled program over the
    stacked states; info has a leading replica axis."""

    def __init__(self, sim: Simulation, abstract_state, data: DeviceData,
                 inputs: replicas_lib.ReplicaInputs, seeds: list[int]):
        self._sim, self._abstract_state, self._data, self._inputs = (sim, abstract_state, data,
                                                                     inputs)
        self._keys = replicas_lib.replica_keys(seeds)
        self._compiled = {}

    def key_at(self, t: int):
        """(R,) iteration t's keys."""
        return replicas_lib.keys_at(self._keys, t)

    def compiled(self, distilling: bool):
        if distilling not in self._compiled:
            step = jax.jit(replicas_lib.make_replica_iteration(self._sim, distilling),
                           donate_argnums=0)
            weight = (jax.ShapeDtypeStruct((), jnp.float32),) if distilling else ()
            self._compiled[distilling] = step.lower(
                self._abstract_state, self.key_at(0), self._data, self._inputs,
                *weight).compile()
        return self._compiled[distilling]

    def __call__(self, state: FLState, t: int) -> tuple[FLState, dict, bool]:
        """Runs iteration t of every replica: (the new states, their info, distilled)."""
        distilling, weight = distillation_at(self._sim, t)
        state, info = self.compiled(distilling)(state, self.key_at(t), self._data,
                                                self._inputs, *weight)
        return state, info, distilling
