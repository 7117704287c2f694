"""The benchmark suite: its peers give jax.grad's gradient; a --quick run writes the report."""

from __future__ import annotations

import functools
import io
import itertools
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench_extend, bench_mlp, dp_sgd_digits, machine, peers, run
from bpjax import MLP

# (activations, loss): every hidden activation and output pair the peers implement
NETS = [
    (("tanh", "relu", "softmax"), "cross_entropy"),
    (("sigmoid", "identity", "sigmoid"), "binary_cross_entropy"),
    (("relu", "tanh", "identity"), "squared_error"),
]
SIZES, BATCH = (5, 7, 6, 3), 9


@functools.cache
def _problem(activations, loss, dtype):
    """``(net, params, x, y, value, grads)``, jax.grad's; NumPy draws (no JAX op to compile)."""
    net = MLP(SIZES, activations, loss)
    rng = np.random.default_rng(0)
    params = [
        {
            "W": jnp.asarray(rng.normal(size=(n_out, n_in)), dtype),
            "b": jnp.asarray(rng.normal(size=n_out), dtype),
        }
        for n_in, n_out in itertools.pairwise(SIZES)
    ]
    x = jnp.asarray(rng.normal(size=(BATCH, SIZES[0])), dtype)
    if loss == "cross_entropy":
        y = jnp.asarray(rng.integers(0, SIZES[-1], BATCH), jnp.int32)
    else:
        y = jnp.asarray(rng.integers(0, 2, (BATCH, SIZES[-1])), dtype)
    value, grads = jax.jit(jax.value_and_grad(net.loss))(params, x, y)
    return net, params, x, y, value, grads


def _assert_close(got_value, got_grads, value, grads, *, rtol):
    np.testing.assert_allclose(got_value, value, rtol=rtol)
    for layer, (got, want) in enumerate(zip(got_grads, grads, strict=True)):
        for name in ("W", "b"):
            scale = float(jnp.max(jnp.abs(want[name])))
            np.testing.assert_allclose(
                got[name], want[name], rtol=rtol, atol=rtol * scale, err_msg=f"layer {layer} {name}"
            )


@pytest.mark.parametrize(("activations", "loss"), NETS, ids=[loss for _, loss in NETS])
def test_numpy_delta_recursion_is_jax_grad_float64(x64, activations, loss):
    net, params, x, y, value, grads = _problem(activations, loss, jnp.float64)
    got_value, got_grads = peers.numpy_value_and_grad(net)(
        peers.to_numpy_params(params), np.asarray(x), np.asarray(y)
    )
    assert got_value.dtype == np.float64 and got_grads[0]["W"].dtype == np.float64
    _assert_close(got_value, got_grads, value, grads, rtol=1e-12)


def test_numpy_delta_recursion_keeps_float32():
    net, params, x, y, value, grads = _problem(*NETS[0], jnp.float32)
    got_value, got_grads = peers.numpy_value_and_grad(net)(
        peers.to_numpy_params(params), np.asarray(x), np.asarray(y)
    )
    assert got_value.dtype == np.float32
    assert all(g[k].dtype == np.float32 for g in got_grads for k in ("W", "b"))
    # One float32 evaluation at the same params: NumPy's and XLA's sums of ≤ 9 terms (the batch,
    # widths ≤ 7) in their own orders, each within γ_9 ≈ 5e-7 of its terms' magnitudes of the
    # exact value. Elementwise with atol = rtol · the leaf's largest element, 1e-5 (the harness's
    # float32 tolerance) leaves a factor of ~20 for cancellation and three layers (used: 2%).
    _assert_close(got_value, got_grads, value, grads, rtol=1e-5)


@pytest.mark.parametrize(("activations", "loss"), NETS, ids=[loss for _, loss in NETS])
def test_torch_eager_autograd_is_jax_grad_float64(x64, activations, loss):
    pytest.importorskip("torch")
    net, params, x, y, value, grads = _problem(activations, loss, jnp.float64)
    step, to_torch = peers.torch_value_and_grad(net, params)
    got_value, got_grads = step(*to_torch(x, y))
    got = peers.torch_grads_to_numpy(got_grads)
    assert got[0]["W"].dtype == np.float64
    _assert_close(got_value.item(), got, value, grads, rtol=1e-12)


def test_torch_status_says_what_is_there():
    status = peers.torch_status()
    try:
        import torch
    except ImportError:
        assert status.startswith("not installed")
    else:
        assert status == f"torch {torch.__version__}"


@pytest.mark.parametrize(
    ("activations", "loss", "message"),
    [
        (("gelu", "softmax"), "cross_entropy", r"activations\[0\]='gelu'"),
        (("tanh", "sigmoid"), "squared_error", "sigmoid \\+ squared_error"),
    ],
)
def test_peers_reject_what_they_do_not_implement(activations, loss, message):
    net = MLP((3, 4, 2), activations, loss)
    with pytest.raises(ValueError, match=f"net: .*{message}"):
        peers.numpy_value_and_grad(net)


def _fake_parallel(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "bench_parallel.py"
    script.write_text(
        "import json, os, sys\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "quick = '--quick' in sys.argv\n"
        "flags = os.environ['XLA_FLAGS']\n" + body
    )
    return script


@pytest.mark.slow
def test_quick_suite_writes_json_markdown_and_plots(tmp_path, monkeypatch):
    script = _fake_parallel(
        tmp_path,
        "json.dump({'markdown': f'| devices | {flags} | quick={quick} |'}, open(path, 'w'))\n",
    )
    monkeypatch.setattr(run, "PARALLEL_SCRIPT", script)
    out = tmp_path / "results"
    assert run.main(["--quick", "--out", str(out)]) == 0
    stem = f"suite_{run.platform_name()}_quick"
    payload = json.loads((out / f"{stem}.json").read_text())
    markdown = (out / f"{stem}.md").read_text()
    assert markdown == payload["markdown"]
    assert {p.name for p in out.glob("*.png")} == {
        f"{stem}_{name}.png" for name in ("mlp", "layers", "extend")
    }
    benchmarks = payload["benchmarks"]
    assert list(benchmarks) == list(run.BENCHMARKS)

    (mlp,) = benchmarks["mlp"]
    expected = {*run.JAX_VARIANTS, run.NUMPY}
    expected |= {run.TORCH} if peers.torch_status().startswith("torch ") else set()
    assert set(mlp["libraries"]) == expected
    # float32 gradients of an 8-16-10 net at batch 8, each library once at the same params: sums
    # of ≤ 16 terms, within γ_16 ≈ 1e-6 of their terms of the exact value, and the mismatch is
    # relative to the largest element of all leaves: 1e-5 holds that (used: ≤ 2e-7, any ISA)
    assert all(0 <= diff < 1e-5 for diff in mlp["grad_mismatch_vs_jax"].values())
    assert all(s["q1"] <= s["median"] <= s["q3"] for s in mlp["times_s"].values())
    # both programs hold at least their arguments (params and the batch, float32) and the output
    floor = 4 * (mlp["params"] + 2 * mlp["batch"] * mlp["sizes"][0]) / 2**20
    assert all(floor <= mib < 1024 for mib in mlp["peak_mib"].values()), mlp["peak_mib"]
    assert {"cpu_model", "cpu_isa", "xla_max_isa"} <= set(payload["machine"])
    (layers,) = benchmarks["layers"]
    assert layers["grad_mismatch"] < 1e-5
    (extend,) = benchmarks["extend"]
    assert [r["quantity"] for r in extend["rows"]] == list(run.QUICK.extend_quantities)
    assert all(r["mismatch_vs_vmap"] < 1e-5 for r in extend["rows"])

    assert benchmarks["parallel"]["status"] == "ok"
    # the runner adds the device count to whatever XLA_FLAGS the suite runs under (an ISA cap,
    # say), so the fake script's row holds at least that flag
    (flags,) = re.findall(r"\| ([^|]*) \| quick=True \|", markdown)
    assert "--xla_force_host_platform_device_count=8" in flags.split()
    for title in ("### MLP value_and_grad", "### CNN and RNN layers", "### Per-example"):
        assert title in markdown


def test_only_runs_the_named_benchmarks_and_says_when_parallel_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "PARALLEL_SCRIPT", tmp_path / "absent.py")
    assert run.main(["--quick", "--only", "parallel", "--out", str(tmp_path)]) == 0
    stem = f"suite_{run.platform_name()}_quick_parallel"
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    assert list(payload["benchmarks"]) == ["parallel"]
    assert payload["benchmarks"]["parallel"]["status"] == "missing"
    assert "not run: absent.py is not there." in (tmp_path / f"{stem}.md").read_text()
    assert not list(tmp_path.glob("*.png"))  # nothing to draw


def test_a_failing_parallel_benchmark_is_reported_not_raised(tmp_path):
    script = _fake_parallel(tmp_path, "print('boom', file=sys.stderr)\nsys.exit(3)\n")
    result = run.run_parallel(run.QUICK, console=run.Console(file=sys.stderr), script=script)
    assert result["status"] == "failed: exit status 3: boom"
    assert result["markdown"] == result["status"]


def test_machine_names_the_cpu_isa_and_the_xla_cap(monkeypatch):
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=avx2"
    )
    info = machine.machine_info()
    assert info["xla_max_isa"] == "AVX2"
    assert info["cpu_isa"] in {"AVX512", "AVX2", "AVX", "SSE4_2", "SVE", "NEON", "unknown"}
    assert info["cpu_model"] and "XLA capped at AVX2" in machine.describe(info)
    monkeypatch.delenv("XLA_FLAGS")
    assert machine.xla_max_isa() is None


@pytest.mark.parametrize("argv", [["--only", "nothing"], ["--pause", "-1"]])
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run.parse_args(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_bench_extend_cli_keeps_working_and_takes_pause():
    args = bench_extend.parse_args(["--sizes", "8,16,4@8", "--pause", "0.5"])
    assert args.pause == 0.5 and args.sizes[0].sizes == (8, 16, 4)
    assert bench_extend.parse_args([]).pause is None


def test_harness_campaign_plants_bugs_of_the_stated_size_and_counts_them():
    from benchmarks import harness_campaign as campaign

    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 4))
    element = campaign.bug_of("element", 1e-3, g, rng)["add"]
    assert np.count_nonzero(element) == 1
    assert np.linalg.norm(element) == pytest.approx(1e-3 * np.linalg.norm(g), rel=1e-12)
    assert campaign.bug_of("scale", 0.05, g, rng) == {"mult": 1.05}
    assert campaign.bug_of("zero", 1.0, g, rng) == {"mult": 0.0}
    record = {"checker": "check_grads", "kind": "scale", "skipped": False}
    records = [
        {**record, "caught": True, "uncatchable": False},
        {**record, "caught": False, "uncatchable": True},
        {**record, "caught": False, "uncatchable": False, "leaf_max_over_tree_max": 0.05},
        {**record, "skipped": True, "caught": False, "uncatchable": False},
    ]
    assert campaign.tally(records)["check_grads / scale"] == {
        "planted": 3, "caught": 1, "missed": 1, "uncatchable": 1, "skipped": 1,
        "missed_small_leaf": 1,
    }  # fmt: skip


# -- bench_extend's CNN case ---------------------------------------------------------------------

TINY_CNN = bench_extend.ConvCase("cnn", (8, 8, 3), (4, 8), 10, 4)


def _bench_tiny_cnn(quantities):
    """``(rows, log)``: ``quantities`` on :data:`TINY_CNN`, one round each, untimed settings."""
    console = run.Console(file=io.StringIO(), width=200)
    rows = bench_extend.bench_case(
        TINY_CNN,
        quantities,
        budget=0.0,
        min_repeats=1,
        max_gib=8.0,
        skip_vmap=(),
        warm_runs=0,
        chunk_gib=1.0,
        seed=0,
        console=console,
    )
    return rows, console.file.getvalue()


def _backpack_installed() -> bool:
    try:
        import backpack  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# float32 quantities of a 2-conv net at batch 4, by three implementations summing in their own
# orders (conv sums of ≤ 3·3·8 = 72 terms, 4 examples, 10 Hessian columns), relative to the leaf
# tree's largest element: 1e-5 leaves a factor of ~10 over what they were seen to differ (≤ 1.4e-6)
AGREE = 1e-5


@pytest.mark.slow
def test_bench_extend_cnn_tiny_agrees_with_vmap_grad_and_backpack():
    rows, log = _bench_tiny_cnn(bench_extend.QUANTITIES)
    assert [r.quantity for r in rows] == list(bench_extend.QUANTITIES)
    by_name = {r.quantity: r for r in rows}
    with_backpack = _backpack_installed()
    if not with_backpack:
        assert "BackPACK skipped" in log
    kfac = by_name.pop("kfac_factors")  # vmap(grad)'s is the MLP's; KFLR's layout is not compared
    assert set(kfac.times) == {"bpjax", "BackPACK"} if with_backpack else {"bpjax"}
    assert kfac.note == "no vmap(grad) version for this network"
    assert kfac.mismatch is None and kfac.mismatch_backpack is None
    for q, r in by_name.items():
        expected = {"bpjax", "vmap(grad)"}
        expected |= {"BackPACK"} if with_backpack and q != "hvp" else set()
        assert set(r.times) == expected, q
        assert set(r.speedup) == expected - {"bpjax"}, q
        assert r.repeats >= 1 and r.note == ""
        if q == "diag_ggn_mc":  # sampled: no reference to compare with
            assert r.mismatch is None and r.mismatch_backpack is None
            continue
        assert r.mismatch < AGREE, q
        if with_backpack and q in bench_extend.COMPARED_WITH_BACKPACK:
            assert r.mismatch_backpack < AGREE, q
        else:
            assert r.mismatch_backpack is None, q
    payload = bench_extend.case_to_json(TINY_CNN, rows)
    assert payload["image"] == [8, 8, 3] and payload["channels"] == [4, 8]
    assert payload["params"] == (3 * 3 * 3 * 4 + 4) + (3 * 3 * 4 * 8 + 8) + (2 * 2 * 8 * 10 + 10)
    assert "Conv4-Pool-Conv8-Pool-Dense10" in bench_extend.markdown(TINY_CNN, rows)


def test_bench_extend_cnn_without_torch_skips_backpack_with_a_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    monkeypatch.setitem(sys.modules, "backpack", None)
    rows, log = _bench_tiny_cnn(["batch_l2_grad", "kfac_factors"])
    assert "BackPACK skipped" in log
    l2, kfac = rows
    assert set(l2.times) == {"bpjax", "vmap(grad)"} and l2.mismatch < AGREE
    assert l2.mismatch_backpack is None
    assert set(kfac.times) == {"bpjax"} and kfac.note == "no vmap(grad) version for this network"


def test_bench_extend_says_which_quantity_bpjax_rejects(monkeypatch):
    original = bench_extend.bpjax_functions

    def hvp(*args):
        raise TypeError("net: no hvp for this network.")

    monkeypatch.setattr(bench_extend, "bpjax_functions", lambda net: {**original(net), "hvp": hvp})
    (row,), log = _bench_tiny_cnn(["hvp"])
    assert row.times == {} and row.note == "skipped (bpjax: TypeError)"
    assert "no hvp for this network" in log


def test_torch_model_of_the_cnn_has_bpjax_logits():
    torch = pytest.importorskip("torch")
    net = bench_extend.build_net(TINY_CNN)
    params, x, _ = bench_extend.make_problem(net, TINY_CNN.batch, seed=0)
    model, back = bench_extend.torch_model(net, params)
    nchw = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        logits = model(nchw).numpy()
    _, cache = net.forward(params, x)
    # float32 sums of ≤ 72 terms in each library's order: 1e-5 of the largest logit holds that
    np.testing.assert_allclose(logits, cache.layers[-1].z, atol=1e-5 * np.abs(logits).max())
    # and every torch parameter maps back onto the bpjax leaf it came from
    for (i, key, to_bpjax), p in zip(back, model.parameters(), strict=True):
        np.testing.assert_array_equal(to_bpjax(p.detach().numpy()), params[i][key])


def test_bench_extend_cli_takes_the_cnn(capsys):
    args = bench_extend.parse_args(["--sizes", "cnn", "cnn:16@8", "8,16,4@8"])
    cnn, small, mlp = args.sizes
    assert cnn == bench_extend.CASES["cnn"]
    assert (cnn.image, cnn.channels, cnn.batch) == ((32, 32, 3), (32, 64), 128)
    assert (small.image, small.batch) == ((16, 16, 3), 8)
    assert mlp.sizes == (8, 16, 4)
    with pytest.raises(SystemExit):
        bench_extend.parse_args(["--sizes", "cnn:2@8"])
    assert "image side" in capsys.readouterr().err


def test_dp_sgd_quick_run_clips_like_vmap_grad(tmp_path):
    pytest.importorskip("sklearn")
    path = tmp_path / "dp.json"
    # C = 4 sits inside the first batch's per-example norms at init (3.1 to 5.9; 84% clipped), so
    # the comparison covers clipped and unclipped examples both
    assert dp_sgd_digits.main(["--quick", "--clip", "4", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    settings = payload["settings"]
    assert settings["quick"] and settings["clip"] == 4.0 and settings["dtype"] == "float64"
    (result,) = payload["results"]
    assert result["batch"] == 32 and result["steps"] == 2
    implementations = set(dp_sgd_digits.IMPLEMENTATIONS)
    assert set(result["accuracy"]) == set(result["train_s"]) == implementations
    assert set(result["times_s"]) == implementations | {"noise draw"}
    assert all(s["q1"] <= s["median"] <= s["q3"] for s in result["times_s"].values())
    assert 0 < result["clipped_fraction"] < 1
    # The quick run trains in float64, and its first step's two clipped means (the same params
    # and batch) are compared: the same sums in other orders (squared norms of ≤ 64 × 64 Gram
    # terms per leaf, γ_4096 ≈ 4.5e-13, then B = 32 scaled terms), so ≤ 1e-10 leaves a factor
    # of ~100 for cancellation (measured: 3e-16); a wrong clip (an example missed, one leaf's
    # norm for the global one) is off by 1e-2 or more. The script asserts it too.
    assert result["agreement_float64"] <= dp_sgd_digits.RTOL_FLOAT64 == 1e-10
    assert result["agreement_float32"] is None  # trained in float64: no float32 figure
    # Two steps from the same params with the same noise: each update differs by the clipped
    # means' roundoff (≤ 1e-10 of it), and the momentum update is linear in it, so the params
    # differ by ≤ 1e-10 of the two updates, themselves a small part of ‖θ‖ (measured: 8e-18);
    # the held-out predictions by at most an example whose top two logits tie.
    assert result["final_params_rel_diff"] <= 1e-10
    accuracies = list(result["accuracy"].values())
    assert all(0 <= a <= 1 for a in accuracies) and abs(accuracies[0] - accuracies[1]) <= 1 / 360


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--clip", "0"], ["--epochs", "0"]])
def test_dp_sgd_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        dp_sgd_digits.parse_args(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_time_blocks_takes_turns_and_times_whole_blocks():
    """Every library, in every round, gets its untimed call and then `block` timed calls in a
    row; the order reverses each round, so neither always follows the other."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = bench_mlp.time_blocks(fns, rounds=4, block=3, settle=0.0)
    assert {name: s.shape for name, s in samples.items()} == dict.fromkeys(fns, (4,))
    assert all(bool(np.all(s >= 0)) for s in samples.values())
    turns = [calls[i] for i in range(0, len(calls), 4)]
    assert calls == [name for name in turns for _ in range(4)]
    assert turns == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]


def test_bench_mlp_control_times_an_a_a_copy_of_jax_grad(capsys):
    """--control adds a second jitted copy of jax.grad's function, timed in the same shuffled
    rounds; its paired ratio and the JSON field say how far apart two equal programs come out."""
    case = bench_mlp.Case("tiny", (4, 5, 3), 6)
    result = bench_mlp.bench_case(
        case,
        activation="tanh",
        output="softmax",
        loss="cross_entropy",
        repeats=5,
        budget=0.0,
        seed=0,
        control=True,
    )
    assert result.control is not None and result.control.median > 0
    assert bench_mlp.result_to_json(result)["ratio_control_over_jax"]["median"] > 0
    plain = bench_mlp.bench_case(
        case, activation="tanh", output="softmax", loss="cross_entropy", repeats=3, budget=0.0,
        seed=0,
    )  # fmt: skip
    assert (
        plain.control is None and bench_mlp.result_to_json(plain)["ratio_control_over_jax"] is None
    )
    assert bench_mlp.main(["--sizes", "4,5,3@6", "--repeats", "3", "--control"]) == 0
    assert "A/A" in capsys.readouterr().out


def test_time_interleaved_shuffles_three_or_more_and_alternates_two():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    bench_mlp.time_interleaved(fns, (), repeats=60)
    rounds = [tuple(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    # every function follows every other within rounds: no fixed order as a reversal would give
    follows = {(r[i], r[i + 1]) for r in rounds for i in range(2)}
    assert follows == {(p, q) for p in "abc" for q in "abc" if p != q}
    calls.clear()
    bench_mlp.time_interleaved({k: fns[k] for k in "ab"}, (), repeats=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
