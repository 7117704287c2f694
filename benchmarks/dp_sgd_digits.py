"""DP-SGD on scikit-learn's 8×8 digits: bpjax's clipping against vmap(grad), side by side.

The network is the CNN of ``tests/test_digits_cnn.py`` (Conv2D(8, 3, SAME, relu) → MaxPool2D(2) →
Conv2D(16, 3, SAME, relu) → MaxPool2D(2) → Flatten → Dense(10, softmax), cross-entropy, float32)
on the same 80/20 split (a fixed permutation). Each step of DP-SGD (Abadi et al. 2016) clips
every per-example gradient ``g_n = ∇_θ C_n`` to norm ``C`` and adds Gaussian noise to the sum:

    ĝ = (Σ_n min(1, C/‖g_n‖) g_n + N(0, σ² C² I)) / B
      = clipped_mean + (σ C / B) ξ,   ξ ~ N(0, I)

then takes an optax SGD step (momentum 0.9, a constant learning rate ``lr · B / 256``). Two
implementations of ``clipped_mean = (1/B) Σ_n min(1, C/‖g_n‖) g_n`` run side by side (neither
needs the sum: the noise is added to the mean as ``(σ C / B) ξ``):

* ``bpjax``: ``bpjax.extend.clipped_grad(net, params, x, y, C)``, which returns exactly that
  mean: per-example norms from the layers' closed forms (no per-example gradient where a layer
  has one), then each layer's backward with row ``n`` of its error scaled by ``s_n / B``;
* ``vmap(grad)``: the standard JAX way, ``jax.vmap(jax.grad(loss of one example))`` → per-example
  global norms → ``min(1, C/‖g_n‖)`` → the weighted sum over the batch, divided by ``B``.

Both runs start from the same init, see the same batches in the same order (a fixed permutation
per epoch, the remainder dropped) and add the same noise (drawn once per step from
``fold_in(key, step)`` and handed to both), so they differ by roundoff alone, which float32
training can amplify through ReLU and max-pool decisions that flip (``tests/test_digits_cnn.py``).
The first step's two clipped means (same params, same batch) are compared, and again in float64
where they agree to ~1e-16 (asserted ≤ 1e-10). ``--quick`` (B = 32, two steps) trains in float64,
so its first step is that comparison.

Per batch size the table gives the held-out accuracy of each run and the time of one jitted DP-SGD
step: the clipped mean, adding the noise and the optax update (the noise draw, the same for both,
is timed apart). Each step is compiled and run once first, then the two are called in interleaved
rounds, the order varied by round (``bench_mlp.time_interleaved``); medians with the
interquartile range, the speed-up the median of the per-round paired ratios. No privacy
accountant is installed, so no ε is reported: the table gives σ, C, the sampling ratio
``q = B/N`` and the number of steps (batches are shuffled, not Poisson-sampled, as is usual in
practice).

Usage::

    python benchmarks/dp_sgd_digits.py                       # B = 64 and 256, ~1 minute
    python benchmarks/dp_sgd_digits.py --batch 128 --epochs 40 --sigma 0.8 --json out.json
    python benchmarks/dp_sgd_digits.py --quick               # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from rich.console import Console
from rich.table import Table

# Before bpjax: run as a script from a checkout (a git worktree), this checkout's bpjax is the one
# imported and timed, not an editable install of another
if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bpjax as bp
from benchmarks.bench_mlp import Stats, auto_repeats, time_interleaved
from benchmarks.machine import describe, machine_info
from bpjax import extend as bx
from bpjax.layers import Conv2D, Dense, Flatten, MaxPool2D

N_TRAIN = 1437  # 80% of the 1797 digits, as in tests/test_digits_cnn.py
IMPLEMENTATIONS = ("bpjax", "vmap(grad)")
LR_BATCH = 256
"""``--lr`` is the learning rate at this batch size; at ``B`` it is ``lr · B / LR_BATCH``.

The noise on ``ĝ`` has standard deviation ``σ C / B`` per coordinate, so a step of a fixed
learning rate is 4× noisier at B = 64 than at B = 256; scaling the rate with ``B`` keeps the
noise per epoch alike (at σ = 1, C = 1 over 20 epochs 0.2 was best of 0.1–1 at B = 256, and
0.05 of 0.02–0.2 at B = 64)."""
RTOL_FLOAT64 = 1e-10
"""The float64 agreement asserted between the two clipped means on the first batch.

Both are the same sums in other orders: the squared norms sum ≤ 64 × 64 products per leaf (the
conv kernels' Gram forms over the 8×8 positions), the scales ``min(1, C/‖g_n‖)`` inherit their
relative roundoff (≤ γ_4096 ≈ 4.5e-13), and the clipped sum adds ``B`` more terms; 1e-10, the
harness's float64 tolerance, leaves a factor of ~100 for cancellation. A wrong clip (a missed
example, a norm of one leaf only, the mean instead of the sum) is off by O(1e-2) or more."""

NET = bp.serial(
    Conv2D(8, 3, padding="SAME", activation="relu"),
    MaxPool2D(2),
    Conv2D(16, 3, padding="SAME", activation="relu"),
    MaxPool2D(2),
    Flatten(),
    Dense(10, "softmax"),
    loss="cross_entropy",
    input_shape=(8, 8, 1),
)


class Settings(NamedTuple):
    """What one run does."""

    batches: tuple[int, ...]
    epochs: int
    max_steps: int | None  # stop training after this many steps (--quick)
    quick: bool
    dtype: str  # "float32", or "float64" (--quick's default)
    sigma: float
    clip: float
    lr: float  # at B = LR_BATCH; B's own is lr · B / LR_BATCH
    seed: int
    budget: float  # seconds of step timing per batch size
    min_repeats: int


class Result(NamedTuple):
    """Everything measured at one batch size."""

    batch: int
    q: float  # B / N
    steps: int
    epochs: float  # steps · B / N
    accuracy: dict[str, float]  # held-out, by implementation
    final_params_rel_diff: float  # ‖θ_bpjax − θ_vmap‖ / ‖θ_vmap‖ after training
    train_s: dict[str, float]  # wall time of the training loop (steps only), by implementation
    agreement_float64: float  # ‖Δ clipped mean‖ / ‖clipped mean‖ on the first batch, float64
    agreement_float32: float | None  # the same in float32 (None: trained in float64)
    clipped_fraction: float  # share of the first batch's examples with ‖g_n‖ > C
    repeats: int
    times: dict[str, Stats]  # one DP-SGD step, by implementation, and "noise draw"
    speedup: Stats  # vmap(grad) / bpjax, paired per round


# -- data ----------------------------------------------------------------------------------------


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: pixels in [0, 1] as (n, 8, 8, 1), integer labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def batch_order(n: int, batch: int, epochs: int) -> np.ndarray:
    """``(steps, batch)`` example indices: a fixed permutation per epoch, the remainder dropped."""
    per_epoch = n // batch
    return np.concatenate(
        [np.random.default_rng(1 + e).permutation(n)[: per_epoch * batch] for e in range(epochs)]
    ).reshape(-1, batch)


# -- the two clipped means -----------------------------------------------------------------------


def clipped_mean_bpjax(params: Any, x: jax.Array, y: jax.Array, clip: float) -> tuple[Any, None]:
    """``(1/B) Σ_n min(1, C/‖g_n‖) g_n`` by :func:`bpjax.extend.clipped_grad` (and no norms)."""
    return bx.clipped_grad(NET, params, x, y, clip), None


def _example_loss(params: Any, xn: jax.Array, yn: jax.Array) -> jax.Array:
    return NET.loss(params, xn[None], yn[None])


def clipped_mean_vmap(
    params: Any, x: jax.Array, y: jax.Array, clip: float
) -> tuple[Any, jax.Array]:
    """The same mean the standard JAX way: per-example gradients, global norms, clip, sum; and
    the squared norms ``‖g_n‖²``, ``(B,)``, which it computes anyway."""
    g = jax.vmap(jax.grad(_example_loss), in_axes=(None, 0, 0))(params, x, y)
    sq = sum(jnp.sum(t.reshape(t.shape[0], -1) ** 2, axis=1) for t in jax.tree.leaves(g))
    scale = jnp.minimum(1.0, clip / jnp.sqrt(sq))  # ‖g_n‖ = 0 gives inf, then 1: nothing to clip
    return jax.tree.map(lambda t: jnp.tensordot(scale, t, axes=1) / x.shape[0], g), sq


CLIPPED_MEANS: dict[str, Callable[..., tuple[Any, jax.Array | None]]] = {
    "bpjax": clipped_mean_bpjax,
    "vmap(grad)": clipped_mean_vmap,
}
"""``f(params, x, y, C) -> (clipped mean, ‖g_n‖² or None)`` by implementation."""


def rel_diff(a: Any, b: Any) -> float:
    """``‖a − b‖ / ‖b‖`` over all leaves together, in NumPy float64 (no XLA op to compile)."""
    pairs = [
        (np.asarray(u, np.float64), np.asarray(v, np.float64))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    num = sum(float(np.sum((u - v) ** 2)) for u, v in pairs)
    den = sum(float(np.sum(v**2)) for _, v in pairs)
    return float(np.sqrt(num / max(den, 1e-300)))


def cast(tree: Any, dtype: Any) -> Any:
    """Every leaf of ``tree`` as a ``dtype`` device array, converted in NumPy (no XLA op)."""
    return jax.tree.map(lambda t: jnp.asarray(np.asarray(t).astype(dtype)), tree)


def agreement_float64(params: Any, x: np.ndarray, y: np.ndarray, clip: float) -> float:
    """``rel_diff`` of the two clipped means at ``params`` on ``(x, y)``, computed in float64."""
    with jax.enable_x64(True):
        p, xs, ys = cast(params, np.float64), jnp.asarray(x, jnp.float64), jnp.asarray(y)
        ours, theirs = jax.jit(
            lambda p, x, y: [f(p, x, y, clip)[0] for f in CLIPPED_MEANS.values()]
        )(p, xs, ys)
        return rel_diff(ours, theirs)


# -- DP-SGD --------------------------------------------------------------------------------------


def optimizer(lr: float) -> optax.GradientTransformation:
    return optax.sgd(lr, momentum=0.9)


def init_params(seed: int) -> Any:
    """``NET.init`` in float32 from an RBG key of ``seed``, jitted.

    The RBG key (XLA's RngBitGenerator) rather than the default threefry: XLA:CPU takes 10–15 s
    to compile a threefry draw of a rank-4 shape such as the conv kernels' (rank 1 or 2, the
    same number of elements: under a second), an RBG draw about a second.
    """
    key = jax.random.key(seed, impl="rbg")
    return jax.block_until_ready(jax.jit(lambda k: NET.init(k, jnp.float32))(key))


@functools.partial(jax.jit, static_argnums=2)
def draw_noise(key: jax.Array, t: jax.Array, size: int, scale: jax.Array) -> jax.Array:
    """Step ``t``'s noise on the clipped mean, ``scale · ξ`` with ``ξ ~ N(0, I_size)``.

    With ``scale = σ C / B`` this is ``N(0, σ² C² I)`` on the clipped sum, divided by ``B``. It is
    drawn apart from the step and handed to either implementation's step: the same numbers for
    both, and the PRNG program (XLA:CPU is slow to compile it) compiled once.
    """
    return scale * jax.random.normal(jax.random.fold_in(key, t), (size,), scale.dtype)


def make_step(
    clipped_mean: Callable[..., Any], settings: Settings, batch: int
) -> Callable[..., Any]:
    """One jitted DP-SGD step ``(params, state, x, y, index, noise) -> (params, state, mean,
    sq_norms)``.

    ``x, y`` are the whole training set and ``index`` the batch's rows, so the step's data never
    leave the device; ``noise`` is :func:`draw_noise`'s, flat like ``ravel_pytree(params)``. The
    step also returns its clipped mean, flat, and what ``clipped_mean`` gives beside it (the
    per-example squared norms or None): the first step's are compared, at no extra compilation.
    """
    opt = optimizer(settings.lr * batch / LR_BATCH)
    clip = settings.clip

    @jax.jit
    def step(params, state, x, y, index, noise):
        mean, sq_norms = clipped_mean(params, x[index], y[index], clip)
        flat, unravel = ravel_pytree(mean)
        # optax mixes Python floats into its state updates; strict promotion would reject them
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(unravel(flat + noise), state, params)
        return optax.apply_updates(params, updates), state, flat, sq_norms

    return step


def optimizer_state(params: Any) -> Any:
    with jax.numpy_dtype_promotion("standard"):
        return optimizer(0.0).init(params)  # SGD's momentum state does not depend on lr


@jax.jit
def _predict(params: Any, x: jax.Array) -> jax.Array:
    return jnp.argmax(NET(params, x), axis=-1)


def train(
    step: Callable[..., Any],
    params: Any,
    data: tuple[jax.Array, jax.Array],
    indices: Sequence[jax.Array],
    noises: Sequence[jax.Array],
) -> tuple[Any, float]:
    """Runs ``step`` over the batches; returns the params and the seconds taken."""
    state = optimizer_state(params)
    start = time.perf_counter()
    for index, noise in zip(indices, noises, strict=True):
        params, state, _, _ = step(params, state, *data, index, noise)
    params = jax.block_until_ready(params)
    return params, time.perf_counter() - start


def bench_batch(
    batch: int,
    settings: Settings,
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    params: Any,
    console: Console,
) -> Result:
    """Checks, trains and times DP-SGD at one batch size, from ``params``, in settings.dtype."""
    with jax.enable_x64(settings.dtype == "float64"):
        return _bench_batch(batch, settings, digits, cast(params, settings.dtype), console)


def _bench_batch(
    batch: int,
    settings: Settings,
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    params: Any,
    console: Console,
) -> Result:
    x_train, y_train, x_test, y_test = digits
    dtype = settings.dtype
    order = batch_order(N_TRAIN, batch, settings.epochs)
    if settings.max_steps is not None:
        order = order[: settings.max_steps]

    data = (jnp.asarray(x_train, dtype), jnp.asarray(y_train))
    # one device array per step, each put from NumPy: iterating over one (steps, B) device array
    # would compile an unstack into that many outputs (7 s on XLA:CPU for 110 steps)
    indices = [jnp.asarray(row) for row in order]
    key = jax.random.key(settings.seed + 1, impl="rbg")
    size = ravel_pytree(params)[0].size
    scale = jnp.asarray(settings.sigma * settings.clip / batch, dtype)
    noises = [draw_noise(key, jnp.asarray(t, jnp.int32), size, scale) for t in range(len(order))]
    noises = jax.block_until_ready(noises)  # drawn before the clocks start, the same for both
    args = (params, optimizer_state(params), *data, indices[0], noises[0])
    steps = {n: make_step(f, settings, batch) for n, f in CLIPPED_MEANS.items()}
    # compile before the training loop's clock starts; the first step's clipped means compared
    first = {n: jax.block_until_ready(step(*args)) for n, step in steps.items()}
    diff = rel_diff(first["bpjax"][2], first["vmap(grad)"][2])
    norms = np.sqrt(np.asarray(first["vmap(grad)"][3], np.float64))
    if dtype == "float64":
        diff64, diff32 = diff, None
    else:
        diff64 = agreement_float64(params, x_train[order[0]], y_train[order[0]], settings.clip)
        diff32 = diff
    if not diff64 <= RTOL_FLOAT64:
        raise AssertionError(f"B={batch}: clipped means differ by {diff64:.2e} in float64")
    clipped_fraction = float(np.mean(norms > settings.clip))
    console.log(
        f"B={batch}: first batch ‖g_n‖ median {np.median(norms):.3g} (range {norms.min():.3g}–"
        f"{norms.max():.3g}), {clipped_fraction:.0%} clipped at C={settings.clip}; clipped "
        f"means differ by {diff64:.1e} (float64), {_e(diff32)} (float32)"
    )

    final, train_s, accuracy = {}, {}, {}
    for name, step in steps.items():
        final[name], train_s[name] = train(step, params, data, indices, noises)
        predicted = np.asarray(_predict(final[name], jnp.asarray(x_test, dtype)))
        accuracy[name] = float(np.mean(predicted == y_test))
        console.log(
            f"B={batch} {name}: {len(order)} steps in {train_s[name]:.2f} s, "
            f"held-out accuracy {accuracy[name]:.2%}"
        )

    fns = {name: functools.partial(step, *args) for name, step in steps.items()}
    fns["noise draw"] = functools.partial(draw_noise, key, jnp.asarray(0, jnp.int32), size, scale)
    once = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        once[name] = time.perf_counter() - start
    repeats = auto_repeats(sum(once.values()), settings.budget, lo=settings.min_repeats, hi=501)
    samples = time_interleaved(fns, (), repeats=repeats)
    times = {n: Stats.of(s) for n, s in samples.items()}
    return Result(
        batch=batch,
        q=batch / N_TRAIN,
        steps=len(order),
        epochs=len(order) * batch / N_TRAIN,
        accuracy=accuracy,
        final_params_rel_diff=rel_diff(final["bpjax"], final["vmap(grad)"]),
        train_s=train_s,
        agreement_float64=diff64,
        agreement_float32=diff32,
        clipped_fraction=clipped_fraction,
        repeats=repeats,
        times=times,
        speedup=Stats.of(samples["vmap(grad)"] / samples["bpjax"]),
    )


# -- reporting -----------------------------------------------------------------------------------


def _e(value: float | None) -> str:
    return "—" if value is None else f"{value:.0e}"


def _ms(stats: Stats) -> str:
    return f"{stats.median * 1e3:.3g} [{stats.q1 * 1e3:.3g}–{stats.q3 * 1e3:.3g}]"


def _x(stats: Stats) -> str:
    return f"{stats.median:.2f}× [{stats.q1:.2f}–{stats.q3:.2f}]"


COLUMNS = (
    "B",
    "q = B/N",
    "steps",
    "bpjax acc",
    "vmap(grad) acc",
    "bpjax ms/step",
    "vmap(grad) ms/step",
    "vmap / bpjax",
    "Δ clipped mean (f64, f32)",
)


def _cells(r: Result) -> list[str]:
    return [
        str(r.batch),
        f"{r.q:.3f}",
        str(r.steps),
        f"{r.accuracy['bpjax']:.1%}",
        f"{r.accuracy['vmap(grad)']:.1%}",
        _ms(r.times["bpjax"]),
        _ms(r.times["vmap(grad)"]),
        _x(r.speedup),
        f"{r.agreement_float64:.0e}, {_e(r.agreement_float32)}",
    ]


def render(results: Sequence[Result], settings: Settings) -> Table:
    table = Table(
        title=f"DP-SGD on digits, σ = {settings.sigma}, C = {settings.clip}, "
        f"lr = {settings.lr} · B/{LR_BATCH}, {settings.dtype}",
        caption="ms/step: one jitted step (clip, noise, SGD update), median [IQR]; Δ: "
        "‖bpjax − vmap(grad)‖ / ‖vmap(grad)‖ of the first batch's clipped mean",
        caption_justify="left",
    )
    for header in COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for r in results:
        table.add_row(*_cells(r))
    return table


def markdown(results: Sequence[Result]) -> str:
    """The table as GitHub markdown (for the README)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join(["---:"] * len(COLUMNS)) + " |"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in results]
    return "\n".join(lines)


def result_to_json(r: Result) -> dict[str, Any]:
    out = r._asdict()
    out["times_s"] = {n: s._asdict() for n, s in out.pop("times").items()}
    out["speedup"] = r.speedup._asdict()
    return out


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[64, 256], help="batch sizes (default 64 256)"
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the data (default 20)")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier σ (default 1)")
    parser.add_argument("--clip", type=float, default=1.0, help="clipping norm C (default 1)")
    parser.add_argument(
        "--lr",
        type=float,
        default=0.2,
        help=f"SGD learning rate at B = {LR_BATCH}, scaled linearly with B (default 0.2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="init and noise seed (default 0)")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of step timing per B")
    parser.add_argument("--min-repeats", type=int, default=21, help="timing rounds at least")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="training dtype (default float32; float64 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long smoke run: B = 32, 2 steps, 3 timing rounds, float64",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    for name in ("epochs", "min_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.batch) < 1 or max(args.batch) > N_TRAIN:
        parser.error(f"--batch must be between 1 and {N_TRAIN}")
    if args.sigma < 0 or args.clip <= 0 or args.lr <= 0:
        parser.error("--sigma must be ≥ 0, --clip and --lr > 0")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        batches=(32,) if quick and args.batch == [64, 256] else tuple(args.batch),
        epochs=1 if quick else args.epochs,
        max_steps=2 if quick else None,
        quick=quick,
        dtype=args.dtype or ("float64" if quick else "float32"),
        sigma=args.sigma,
        clip=args.clip,
        lr=args.lr,
        seed=args.seed,
        budget=0.0 if quick else args.budget,
        min_repeats=3 if quick else args.min_repeats,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_of(args)
    console = Console(width=None if sys.stdout.isatty() else 160)
    m = machine_info()
    console.print(
        f"jax {m['jax']}, backend {m['backend']}, {describe(m)}; "
        f"σ = {settings.sigma}, C = {settings.clip}, "
        f"lr = {settings.lr} · B/{LR_BATCH}, SGD momentum 0.9, {settings.epochs} epochs, "
        f"{settings.dtype}"
    )
    start = time.perf_counter()
    digits = load_digits()
    params = init_params(settings.seed)
    results = [bench_batch(b, settings, digits, params, console) for b in settings.batches]
    console.print(render(results, settings))
    console.print(markdown(results), markup=False, highlight=False)
    console.print(f"({time.perf_counter() - start:.0f} s)")
    if args.json is not None:
        payload = {
            "machine": m,
            "settings": settings._asdict(),
            "results": [result_to_json(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
