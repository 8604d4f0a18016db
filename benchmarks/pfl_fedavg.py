"""Apple's pfl-research simulator (pfl 0.6.0, PyTorch backend) on the task of our FedAvg run.

Measures the wall time of one pfl central iteration of FedAvg on exactly the task that
`--algorithm=fedavg` runs here, to compare with marfl_jax's per-iteration time:

* data: the embedded MNIST subset (marfl_jax/data/mnist10k.npz), the same fixed stratified
  8,000 / 2,000 train/test split and the same `iid` partition (64 clients x 125 contiguous
  training examples), preprocessed as `marfl_jax.data.preprocess` does (x/255, then (x - 0.1307)
  / 0.3081). The split and the partition are reimplemented here in numpy (this environment has no
  jax, so it cannot import marfl_jax); they are the same code as `stratified_split` and the `iid`
  partition, and give identical index arrays;
* model: `--model=mlp` (784-200-10, ReLU) or `--model=cnn` (the paper's CNN: conv3x3 32, conv3x3
  64, max-pool 2x2, dense 128, dense 10; 1,199,882 parameters) as torch.nn modules, initialized
  like flax (truncated-normal LeCun kernels, zero biases);
* each central iteration all 64 clients train: b=4 mini-batches of B=16 from a fresh random
  permutation of the client's 125 examples (as `marfl_jax.data.sample_batches` draws them; the
  draws come from numpy, not from jax's generator), with the authors' EMA momentum SGD
  m <- 0.9 m + 0.1 g, theta <- theta - 0.1 m. pfl builds a new local optimizer for every client
  in every round, so each client's momentum starts at zero each round (ours averages the momentum
  with the weights); the server averages the clients' model differences (FedAvg, all weights 1,
  central SGD with learning rate 1.0 = plain averaging of the models);
* the test set (2,000 examples) is evaluated after the last iteration (pfl's
  CentralEvaluationCallback, which also evaluates the initial model before training).

The time of each central iteration is taken by a callback between consecutive
`after_central_iteration` calls (the first one from `on_train_begin`); the figure is the median
over iterations 2..N-1 (the first is a warm-up, and pfl evaluates every client's data in it
before and after local training; the last one includes the test-set evaluation). Every worker
process uses one torch thread.

`--workers=2` runs two pfl worker processes through pfl's own multi-worker mode without Horovod:
the script starts itself twice with PFL_WORKER_ADDRESSES / PFL_WORKER_RANK, pfl joins them in a
torch.distributed (gloo) process group, each trains half of the clients, and the model updates
are all-reduced every iteration. (Started under `torchrun --nproc_per_node=2`, the script uses
torchrun's process group instead.)

Needs pfl and torch, which marfl_jax's environment does not have; use a separate one:

    python -m venv /tmp/pflenv && /tmp/pflenv/bin/pip install 'pfl[pytorch]==0.6.0'
    /tmp/pflenv/bin/python benchmarks/pfl_fedavg.py --model=mlp --workers=1 --iterations=12

It prints one line, e.g. (2 workers, measured on a 2-core Intel Xeon on 2026-12-02)
`pfl 0.6.0 FedAvg mlp 64 clients b=4 B=16: 0.115 s per central iteration (median of iterations
2-11), 2 workers x 1 thread, accuracy 0.8375, peak RSS 0.76 GB per process, CPU Intel(R) Xeon(R)
Processor` (with several workers, the RSS is the largest process's). `--verbose` adds the
per-iteration times and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

NUM_CLIENTS = 64
LOCAL_BATCHES = 4
BATCH_SIZE = 16
LEARNING_RATE = 0.1
MOMENTUM = 0.9
NUM_CLASSES = 10
SEED = 0

# As marfl_jax/data/sources.py and common.py.
MNIST10K = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "marfl_jax",
                        "data", "mnist10k.npz")
MNIST10K_SPLIT_SEED = 20_251_205
MNIST10K_NUM_TEST = 2_000
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_CHILD = "PFLBENCH_CHILD"


# --------------------------------------------------------------------------------------------
# Data: the same split, partition and preprocessing as marfl_jax (numpy only).
# --------------------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, num_test: int, seed: int):
    """marfl_jax.data.common.stratified_split, verbatim."""
    rng = np.random.default_rng(seed)
    classes, class_counts = np.unique(labels, return_counts=True)
    quota = class_counts * num_test / len(labels)
    test_counts = np.floor(quota).astype(np.int64)
    shortfall = num_test - test_counts.sum()
    test_counts[np.argsort(-(quota - test_counts), kind='stable')[:shortfall]] += 1
    train_parts, test_parts = [], []
    for cls, n_test in zip(classes, test_counts, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(test_parts))


def iid_table(num_examples: int, num_clients: int) -> np.ndarray:
    """The `iid` partition's index table: contiguous slices of floor(n/N) (n divisible here)."""
    size = num_examples // num_clients
    assert size * num_clients == num_examples, (num_examples, num_clients)
    return np.arange(num_examples).reshape(num_clients, size)


def preprocess(x: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 1, 28, 28) NCHW, scaled to [0, 1] and standardized."""
    scaled = x.astype(np.float32) / 255.0
    return ((scaled - MNIST_MEAN) / MNIST_STD).astype(np.float32)[:, None]


def load_task():
    """(client_x (64, 125, 1, 28, 28), client_y (64, 125), x_test, y_test)."""
    with np.load(MNIST10K) as arrays:
        images, labels = arrays['x'], arrays['y'].astype(np.int32)
    train_idx, test_idx = stratified_split(labels, MNIST10K_NUM_TEST, MNIST10K_SPLIT_SEED)
    x_train, y_train = preprocess(images[train_idx]), labels[train_idx]
    table = iid_table(len(train_idx), NUM_CLIENTS)
    return x_train[table], y_train[table], preprocess(images[test_idx]), labels[test_idx]


# --------------------------------------------------------------------------------------------
# Model and optimizer.
# --------------------------------------------------------------------------------------------


def build_module(torch, name: str):
    """benchmarks/training_throughput.py's torch modules, with pfl's `loss` and `metrics`."""
    from pfl.metrics import Weighted

    nn = torch.nn
    functional = torch.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if name == "mlp":
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(),
                                          nn.Linear(200, NUM_CLASSES))
            else:
                self.body = nn.Sequential(
                    nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                    nn.MaxPool2d(2), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(),
                    nn.Linear(128, NUM_CLASSES))
            # flax's defaults: kernel lecun_normal (truncated normal, variance 1/fan_in, cut at
            # 2 standard deviations), bias zeros.
            for layer in self.body:
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    fan_in = layer.weight[0].numel()
                    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
                    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                    nn.init.zeros_(layer.bias)

        def forward(self, x):
            return self.body(x)

        def loss(self, x, y, eval=False):  # noqa: A002 (pfl's keyword)
            self.eval() if eval else self.train()
            return functional.cross_entropy(self(x), y.long())

        @torch.no_grad()
        def metrics(self, x, y, eval=True):  # noqa: A002
            self.eval() if eval else self.train()
            logits = self(x)
            y = y.long()
            n = len(y)
            loss = float(functional.cross_entropy(logits, y, reduction="sum"))
            correct = float((logits.argmax(-1) == y).sum())
            return {"loss": Weighted(loss, n), "accuracy": Weighted(correct, n)}

    return Net()


def ema_momentum_sgd(torch):
    """The authors' optimizer: m <- beta*m + (1-beta)*g; theta <- theta - lr*m."""

    class EmaMomentumSGD(torch.optim.Optimizer):
        def __init__(self, params, lr=LEARNING_RATE, beta=MOMENTUM):
            super().__init__(params, {"lr": lr, "beta": beta})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if "m" not in state:
                        state["m"] = torch.zeros_like(p)
                    m = state["m"]
                    m.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                    p.add_(m, alpha=-group["lr"])

    return EmaMomentumSGD


# --------------------------------------------------------------------------------------------
# One pfl worker process.
# --------------------------------------------------------------------------------------------


def run_worker(args):
    """Trains with pfl in this process (rank r of world_size); rank 0 prints the result line.

    Returns the trained torch module.
    """
    import warnings

    import torch

    # pfl 0.6.0's all-reduce uses torch.distributed.reduce_op, deprecated in torch 2.x.
    warnings.filterwarnings("ignore", message=".*reduce_op.*", category=FutureWarning)

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    np.random.seed(SEED)  # pfl draws its samplers' seeds from numpy: same on every worker.
    torch.manual_seed(SEED)  # Same initial model on every worker.

    import pfl
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    distributed = get_default_framework_module().distributed
    rank, world_size = distributed.global_rank, distributed.world_size

    client_x, client_y, x_test, y_test = load_task()
    # Each client's own generator: a fresh permutation of its 125 examples every round, read in
    # order as b=4 batches of 16 (local_num_steps=4 stops after them). Whichever worker trains a
    # client draws the same permutations, so the run does not depend on --workers.
    client_rngs = [np.random.default_rng([SEED, client]) for client in range(NUM_CLIENTS)]

    def make_client_dataset(client: int) -> Dataset:
        order = client_rngs[client].permutation(client_x.shape[1])
        return Dataset((client_x[client][order], client_y[client][order]), user_id=str(client))

    # MinimizeReuseUserSampler cycles through the ids: a cohort of 64 is every client once,
    # dealt round-robin to the workers.
    train_data = FederatedDataset(make_client_dataset,
                                  MinimizeReuseUserSampler(list(range(NUM_CLIENTS))))
    backend = SimulatedBackend(training_data=train_data, val_data=None)

    module = build_module(torch, args.model)  # On the CPU, where PyTorchModel keeps it.
    model = PyTorchModel(
        model=module,
        local_optimizer_create=ema_momentum_sgd(torch),
        # The averaged model difference is applied as a gradient -diff: SGD(lr=1) adds it.
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))

    algorithm_params = NNAlgorithmParams(
        central_num_iterations=args.iterations,
        # Per-client evaluation before and after local training runs in iterations i with
        # i % evaluation_frequency == 0: only the first (warm-up) one here.
        evaluation_frequency=args.iterations,
        train_cohort_size=NUM_CLIENTS,
        val_cohort_size=None)
    train_params = NNTrainHyperParams(
        local_num_epochs=None, local_num_steps=LOCAL_BATCHES, local_batch_size=BATCH_SIZE,
        local_learning_rate=LEARNING_RATE)
    eval_params = NNEvalHyperParams(local_batch_size=500)

    class IterationTimer(TrainingProcessCallback):
        """Stamps the end of each central iteration; keeps the test accuracy it is handed."""

        def __init__(self):
            self.stamps: list[float] = []
            self.accuracy = float("nan")

        def on_train_begin(self, *, model):
            self.stamps = [time.perf_counter()]
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.stamps.append(time.perf_counter())
            for key, value in aggregate_metrics.to_simple_dict().items():
                if key.startswith("Central val") and key.endswith("accuracy"):
                    self.accuracy = float(value)
            return False, Metrics()

    timer = IterationTimer()
    # Evaluates the initial model in on_train_begin (before the timer starts) and then only after
    # the last iteration; each worker evaluates its share of the test set, all-reduced.
    evaluation = CentralEvaluationCallback(Dataset((x_test, y_test)), eval_params,
                                           frequency=max(1, args.iterations - 1))

    FederatedAveraging().run(
        algorithm_params=algorithm_params, backend=backend, model=model,
        model_train_params=train_params, model_eval_params=eval_params,
        callbacks=[evaluation, timer], send_metrics_to_platform=False)

    times = np.diff(timer.stamps)
    timed = times[1:args.iterations - 1]  # Iterations 2..N-1 (1-based).
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux.
    rss_all = [rss_gb]
    if world_size > 1:
        rss_all = [None] * world_size
        torch.distributed.all_gather_object(rss_all, rss_gb)
    if torch.distributed.is_initialized():
        # Leave together: a gloo peer that exits first can make the other abort at shutdown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return module
    version = getattr(pfl, "__version__", None)
    if version is None:
        from pfl.version import __version__ as version
    print(f"pfl {version} FedAvg {args.model} {NUM_CLIENTS} clients b={LOCAL_BATCHES} "
          f"B={BATCH_SIZE}: {statistics.median(timed):.3f} s per central iteration (median of "
          f"iterations 2-{args.iterations - 1}), {world_size} workers x "
          f"{torch.get_num_threads()} thread, accuracy {timer.accuracy:.4f}, peak RSS "
          f"{max(rss_all):.2f} GB per process, CPU {cpu_name()}", flush=True)
    if args.verbose:
        print("per-iteration seconds: " + " ".join(f"{t:.3f}" for t in times), flush=True)
        print("peak RSS GB by rank: " + " ".join(f"{r:.2f}" for r in rss_all), flush=True)
    return module


# --------------------------------------------------------------------------------------------
# Launcher.
# --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(args) -> int:
    """Starts args.workers copies of this script as pfl workers (PFL_WORKER_ADDRESSES/RANK)."""
    addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(args.workers))
    children = []
    for rank in range(args.workers):
        env = dict(os.environ, PFL_WORKER_ADDRESSES=addresses, PFL_WORKER_RANK=str(rank),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{_CHILD: "1"})
        children.append(subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                          *sys.argv[1:]], env=env))
    while True:  # If a worker fails, stop the others rather than leave them waiting on it.
        codes = [child.poll() for child in children]
        failed = [code for code in codes if code]
        if failed or all(code == 0 for code in codes):
            break
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.terminate()
            child.wait()
    return failed[0] if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--workers", type=int, default=1,
                        help="pfl worker processes (1 torch thread each).")
    parser.add_argument("--iterations", type=int, default=12,
                        help="Central iterations (>= 3; the median is over 2..N-1).")
    parser.add_argument("--verbose", action="store_true", help="Also print each iteration's time.")
    args = parser.parse_args(argv)
    if args.iterations < 3:
        parser.error("--iterations must be >= 3")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    under_launcher = os.environ.get(_CHILD) or "TORCHELASTIC_RUN_ID" in os.environ
    if args.workers > 1 and not under_launcher:
        return launch_workers(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")
    run_worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
