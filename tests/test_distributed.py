"""Calibration and evaluation over two gloo processes give one process's result.

Two processes are started once for the whole module (``torch.multiprocessing`` on loopback); they
run every case and save what they computed, and the tests compare it with the same cases run here
in one process. A second pair runs the command line as torchrun would start it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, ObserverBase, PerChannelMinMaxObserver
from toy_models import perturb

import qmamba_ao.models  # noqa: F401  (registers the timm names)
from qmamba_ao import distributed, ptq
from qmamba_ao.distributed import DistributedError, shard_range
from qmamba_ao.observers import (
    Log2Observer,
    LtSQFakeQuantize,
    LtSQObserver,
    MSEObserver,
    PercentileObserver,
    PerTokenObserver,
    TGQFakeQuantize,
    TGQObserver,
)
from qmamba_ao.observers._base import ReservoirMixin

WORLD = 2
RECIPES = ("minmax", "percentile", "histogram", "qmamba")
#: observers whose state is an interpolated histogram (compared with a tolerance)
APPROXIMATE = (HistogramObserver,)
REPO = Path(__file__).resolve().parents[1]


# -- the cases (run in one process here, in two processes by the workers) -----------------------


def _batches() -> list[Tensor]:
    """Six seeded batches shaped (batch, channels, steps, states). Every batch reaches |x| = 18 at every
    step, so that each process's histograms open on the range one process has at that batch."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        x = (torch.randn(4, 8, 17, 3, generator=g) * (1.0 + i % 3)).clamp(-15, 15)
        x[0, 0, :, 0] = 18.0
        out.append(x)
    return out


def _observers() -> dict[str, nn.Module]:
    q4 = dict(quant_min=0, quant_max=15)
    return {
        "minmax": MinMaxObserver(dtype=torch.quint8, **q4),
        "per_channel": PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
        "percentile": PercentileObserver(percentile=99.0, **q4),
        "per_token": PerTokenObserver(token_axis=2, **q4),
        "log2": Log2Observer(**q4),
        "tgq_range": TGQObserver(num_groups=3, grouping="range", **q4),
        "tgq_mse_uniform": TGQObserver(num_groups=3, grouping="uniform", clip="mse", **q4),
        "tgq_fake_quant": TGQFakeQuantize(num_groups=3, grouping="uniform", **q4),
        "mse_exact": MSEObserver(**q4),
        "ltsq_exact": LtSQObserver(**q4),
        "ltsq_fake_quant": LtSQFakeQuantize(**q4),
        "histogram": HistogramObserver(dtype=torch.quint8, bins=256, **q4),
        "mse_sampled": MSEObserver(sample_size=256, tail_size=16, **q4),
        "ltsq_sampled": LtSQObserver(sample_size=256, tail_size=16, **q4),
        "ltsq_sampled_fake_quant": LtSQFakeQuantize(sample_size=256, tail_size=16, **q4),
        # the exact phase (the first sample_size values) ends inside the second process's share
        "mse_exact_phase_spans": MSEObserver(sample_size=8192, tail_size=16, **q4),
        # calibrated without shard offsets: the samples merge by a seeded draw
        "mse_unsharded": MSEObserver(sample_size=256, tail_size=16, **q4),
        "ltsq_unsharded": LtSQObserver(sample_size=256, tail_size=16, **q4),
    }


UNSHARDED = ("mse_unsharded", "ltsq_unsharded")


def _qparams(m: nn.Module) -> list[Tensor]:
    if isinstance(m, (LtSQFakeQuantize, TGQFakeQuantize)):
        m.disable_observer()  # fixes the fake quantizer's own qparams
        extra = [m.group_index] if isinstance(m, TGQFakeQuantize) else [m.kind, m.param]
        return [m.scale.clone(), m.zero_point.clone(), *[t.clone() for t in extra]]
    return [t.clone() for t in m.calculate_qparams()]


def observer_case() -> dict[str, Any]:
    """Feed this process's share of the batches to one observer of each kind, merge, read them out."""
    batches = _batches()
    mine = shard_range(len(batches))
    observers = _observers()
    told = nn.ModuleDict({k: v for k, v in observers.items() if k not in UNSHARDED})
    distributed.set_shard_offsets(told, (4 * mine.start, mine.start), batch_images=4)
    for i in mine:
        x = batches[i]
        for obs in observers.values():
            if isinstance(obs, (TGQObserver, TGQFakeQuantize)):
                for t in range(x.shape[2]):
                    obs(x[:, :, t], t)
            else:
                obs(x)
    holder = nn.ModuleDict(observers)
    distributed.sync_observers(holder)
    return {
        name: {"qparams": _qparams(obs), "state": {k: v.clone() for k, v in obs.state_dict().items()}}
        for name, obs in observers.items()
    }


def _tiny_vim() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(
            "vim_tiny_patch16_224",
            img_size=28,
            in_chans=1,
            patch_size=7,
            stride=7,
            depth=2,
            embed_dim=32,
            num_classes=10,
        )
    return perturb(model).eval()


def _images() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(64, 1, 28, 28, generator=g)
    test = torch.randn(100, 1, 28, 28, generator=g)
    return calib, test, torch.randint(0, 10, (100,), generator=g)


def model_case(recipe: str) -> dict[str, Any]:
    """A recipe on the tiny Vim: calibrated on this process's share, every observer's qparams, evaluation."""
    model = _tiny_vim()
    calib, test, labels = _images()
    offsets = distributed.calibration_offsets(len(calib), 32)
    shard = distributed.calibration_shard(calib, 32)
    prepared = ptq.prepare_calibrated(model, list(shard.split(32)), recipe, 4, 4, progress=False, shard=offsets)
    qparams = {
        n: (type(m).__name__, [t.clone() for t in m.calculate_qparams()])
        for n, m in prepared.named_modules()
        if isinstance(m, ObserverBase) and not isinstance(m, PerChannelMinMaxObserver)
    }
    samples = {n: m.sample.clone() for n, m in prepared.named_modules() if isinstance(m, ReservoirMixin)}
    quantized = ptq.convert(prepared, reference=True)
    r = ptq.evaluate(quantized, test, labels, batch_size=50, progress=False)
    fp = ptq.evaluate(model, test, labels, batch_size=50, progress=False)
    return {"qparams": qparams, "samples": samples, "eval": r, "fp": fp}


def _all_cases() -> dict[str, Any]:
    out: dict[str, Any] = {"observers": observer_case()}
    for recipe in RECIPES:
        out[recipe] = model_case(recipe)
    try:  # a second merge of the same model is refused
        holder = nn.ModuleDict({"m": MinMaxObserver()})
        distributed.sync_observers(holder)
        distributed.sync_observers(holder)
        out["second_sync"] = "merged twice"
    except DistributedError as e:
        out["second_sync"] = str(e)
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.save(_all_cases(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    assert not distributed.is_distributed()
    return _all_cases()


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# -- sharding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 96, 100, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("block", [1, 32, 500])
def test_shards_cover_every_item_once(n: int, world: int, block: int) -> None:
    parts = [shard_range(n, r, world, block) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert all(p.start % block == 0 for p in parts if len(p))  # whole blocks: the batches one process runs
    blocks = [-(-len(p) // block) for p in parts]
    assert max(blocks) - min(blocks) <= 1  # as even as whole blocks allow


def test_without_a_group_everything_is_local() -> None:
    x = torch.arange(10)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert torch.equal(distributed.local_shard(x, 4), x)
    assert torch.equal(distributed.gather_predictions(x), x)
    assert distributed.all_reduce_sum([3, 4]) == [3, 4]
    holder = nn.ModuleDict({"m": MinMaxObserver()})
    holder["m"](torch.ones(3))
    distributed.sync_observers(holder)  # no-op
    assert float(holder["m"].max_val) == 1.0


# -- observers --------------------------------------------------------------------------------------


EXACT_OBSERVERS = [n for n in _observers() if n not in ("histogram", *UNSHARDED)]


@pytest.mark.parametrize("name", EXACT_OBSERVERS)
def test_observer_state_equals_one_process(name: str, two_processes: list, one_process: dict) -> None:
    want = one_process["observers"][name]
    for got in two_processes:
        got = got["observers"][name]
        assert _equal(got["qparams"], want["qparams"]), name
        for key, value in want["state"].items():
            if key.endswith("sumsq_step"):  # float64 sums in another order
                torch.testing.assert_close(got["state"][key], value, rtol=1e-12, atol=0)
            else:
                assert _equal(got["state"][key], value), f"{name}.{key}"


def test_histogram_observer_is_close(two_processes: list, one_process: dict) -> None:
    """torch.ao's HistogramObserver re-bins when its range grows, so one process's own result depends on
    the batch order: exact min/max, qparams within a few percent."""
    want = one_process["observers"]["histogram"]
    for got in two_processes:
        got = got["observers"]["histogram"]
        assert _equal(got["state"]["min_val"], want["state"]["min_val"])
        assert _equal(got["state"]["max_val"], want["state"]["max_val"])
        assert float(got["state"]["histogram"].sum()) == float(want["state"]["histogram"].sum())
        torch.testing.assert_close(got["qparams"][0], want["qparams"][0], rtol=0.05, atol=0)


@pytest.mark.parametrize("name", UNSHARDED)
def test_sampled_observers_without_shard_offsets(name: str, two_processes: list, one_process: dict) -> None:
    """Without shard offsets: exact min/max, count, tails; the sample is a seeded draw of the same size,
    and the clipping scale stays within 15 % of one process's."""
    want = one_process["observers"][name]
    results = [got["observers"][name] for got in two_processes]
    assert _equal(results[0], results[1])  # every process holds the same merged state
    for key in ("min_val", "max_val", "seen", "num_batches", "tail_lo", "tail_hi"):
        assert _equal(results[0]["state"][key], want["state"][key]), key
    assert results[0]["state"]["sample"].numel() == want["state"]["sample"].numel()
    assert not _equal(results[0]["state"]["sample"], want["state"]["sample"])  # a different draw
    torch.testing.assert_close(results[0]["qparams"][0], want["qparams"][0], rtol=0.15, atol=0)


# -- shares of a reservoir, merged in this process ---------------------------------------------------


def _value_batches(count: int, images: int = 3, per_image: int = 20) -> list[Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(images, per_image, generator=g) * (1 + i % 3) for i in range(count)]


def _shares(make: Any, batches: list[Tensor], cuts: tuple[int, ...]) -> list[nn.Module]:
    """One observer per share ``batches[cuts[r]:cuts[r + 1]]``, told where its share starts."""
    out = []
    for r in range(len(cuts) - 1):
        obs, mine = make(), batches[cuts[r] : cuts[r + 1]]
        obs.start_shard(sum(len(x) for x in batches[: cuts[r]]), cuts[r], len(mine[0]))
        for x in mine:
            obs(x)
        out.append(obs)
    return out


@pytest.mark.parametrize("kind", [LtSQObserver, MSEObserver])
@pytest.mark.parametrize(
    "cuts",
    [
        (0, 1, 10),  # the exact phase (4 batches) ends inside the second share
        (0, 4, 10),  # a share starts exactly as the exact phase is about to end
        (0, 2, 3, 7, 10),  # three shares take part in the exact phase, one share of one batch
        (0, 6, 10),  # the second share starts after the exact phase
    ],
)
def test_shares_merge_into_one_process_sample(kind: type, cuts: tuple[int, ...]) -> None:
    batches = _value_batches(10)  # 60 values a batch; the sample holds 256
    make = lambda: kind(bits=4, sample_size=256, tail_size=16)  # noqa: E731
    whole = make()
    for x in batches:
        whole(x)
    shares = _shares(make, batches, cuts)
    if cuts[1] < 4:  # before the merge, a later share holds placeholders where earlier shares own slots
        assert bool(torch.isnan(shares[-1].sample).any())
        assert shares[-1].held_sample().numel() < 256
    merged = shares[-1]
    distributed.combine_reservoir_parts(merged, [distributed.reservoir_part(o) for o in shares])
    merged.min_val = torch.stack([o.min_val for o in shares]).amin()  # what sync_observers merges besides
    merged.max_val = torch.stack([o.max_val for o in shares]).amax()
    merged._memo = None
    for key in ("sample", "tail_lo", "tail_hi", "seen", "num_batches"):
        assert _equal(getattr(merged, key), getattr(whole, key)), key
    assert _equal(list(merged.calculate_qparams()), list(whole.calculate_qparams()))
    assert merged._shard is None


def test_shard_offsets_that_do_not_match_the_earlier_shares_are_refused() -> None:
    batches = _value_batches(6)
    shares = _shares(lambda: MSEObserver(bits=4, sample_size=64, tail_size=4), batches, (0, 3, 6))
    shares[1]._shard.batches_before = 2  # as if one batch of the first share had not been counted
    with pytest.raises(DistributedError, match=r"process 1 replayed the calibration order from value 180 and batch 2"):
        distributed.combine_reservoir_parts(shares[1], [distributed.reservoir_part(o) for o in shares])


def test_shares_with_and_without_offsets_are_refused() -> None:
    batches = _value_batches(4)
    with_offsets = _shares(lambda: MSEObserver(bits=4, sample_size=64, tail_size=4), batches, (0, 2))[0]
    without = MSEObserver(bits=4, sample_size=64, tail_size=4)
    for x in batches[2:]:
        without(x)
    parts = [distributed.reservoir_part(o) for o in (with_offsets, without)]
    with pytest.raises(DistributedError, match=r"processes \[1\] calibrated without shard offsets"):
        distributed.combine_reservoir_parts(without, parts)


def test_bad_shard_offsets() -> None:
    obs = MSEObserver(bits=4, sample_size=64, tail_size=4)
    holder = nn.ModuleDict({"m": obs})
    with pytest.raises(ValueError, match="need an initialised torch.distributed process group"):
        distributed.set_shard_offsets(holder, (32, 1), batch_images=32)
    with pytest.raises(ValueError, match=r"shard must be a pair \(images_before, batches_before\)"):
        distributed.set_shard_offsets(holder, 32, batch_images=32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="images_before must be an integer >= 0; got -1"):
        distributed.set_shard_offsets(holder, (-1, 0), batch_images=32)
    with pytest.raises(ValueError, match="either both are 0"):
        obs.start_shard(0, 1, 4)
    obs.start_shard(4, 1, 4)
    with pytest.raises(ValueError, match="observed 10 values in a calibration batch of 4 images"):
        obs(torch.ones(10))
    obs = MSEObserver(bits=4, sample_size=64, tail_size=4)
    obs(torch.ones(8))
    with pytest.raises(ValueError, match="has already observed 8 values; set the shard offsets before"):
        obs.start_shard(4, 1, 4)


def test_first_share_offsets_change_nothing_in_one_process() -> None:
    """``(0, 0)`` is accepted without a group and gives the sample of plain calibration."""
    batches = _value_batches(8)
    plain, told = (LtSQObserver(bits=4, sample_size=128, tail_size=8) for _ in range(2))
    assert distributed.set_shard_offsets(nn.ModuleDict({"m": told}), (0, 0), batch_images=3) == 1
    for x in batches:
        plain(x)
        told(x)
    assert _equal(told.sample, plain.sample) and _equal(told.held_sample(), plain.sample)
    assert distributed.calibration_offsets(100, 32) is None  # no group: no offsets


def test_a_model_is_merged_once(two_processes: list, one_process: dict) -> None:
    assert one_process["second_sync"] == "merged twice"  # without a group both calls are no-ops
    for got in two_processes:
        assert "already merged" in got["second_sync"]


# -- models -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_qparams_and_evaluation(recipe: str, two_processes: list, one_process: dict) -> None:
    want = one_process[recipe]
    first = two_processes[0][recipe]
    for rank_result in two_processes:
        got = rank_result[recipe]
        assert _equal(got["qparams"], first["qparams"])  # all processes hold the same model
        for key in ("top1", "top5", "preds"):
            assert _equal(got["fp"][key], want["fp"][key]), key  # float: sharded evaluation is exact
    approx = {n for n, (kind, _) in want["qparams"].items() if kind in {c.__name__ for c in APPROXIMATE}}
    for name, (kind, qp) in want["qparams"].items():
        got_kind, got_qp = first["qparams"][name]
        assert got_kind == kind
        if name in approx:
            torch.testing.assert_close(got_qp[0], qp[0], rtol=0.25, atol=0)
        else:
            assert _equal(got_qp, qp), f"{recipe}: {name} ({kind})"
    assert _equal(first["samples"], want["samples"])  # LtSQ's samples (qmamba): one process's, bit for bit
    if not approx:  # the same quantized model: the same predictions
        for key in ("top1", "top5", "preds"):
            assert _equal(first["eval"][key], want["eval"][key]), key
    else:  # a random model on random images: many near-ties, so a slightly different range flips some
        agree = (first["eval"]["preds"] == want["eval"]["preds"]).float().mean().item()
        assert agree >= 0.75, agree


# -- the command line under a torchrun-style environment ---------------------------------------------


def _cli(rank: int, port: int, args: list[str], **extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": str(WORLD),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "CUDA_VISIBLE_DEVICES": "",
        "QMAMBA_AO_DIST_TIMEOUT": "60",
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "qmamba_ao.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _fmnist_args(tmp_path: Path) -> list[str]:
    return ["compare", "--recipes", "minmax", "--bits", "w4a4", "--calib-size", "40", "--eval-size", "60"]


def test_cli_compare_under_two_processes(tmp_path: Path) -> None:
    from qmamba_ao import api

    out = tmp_path / "out.json"
    port = _free_port()
    procs = [_cli(r, port, [*_fmnist_args(tmp_path), "--json", str(out)]) for r in range(WORLD)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [rc for *_, rc in results] == [0, 0], [err[-2000:] for _, err, _ in results]
    assert "top-1" in results[0][0] and results[1][0] == ""  # only process 0 prints the table
    records = json.loads(out.read_text())
    # the same run in this one process
    model = api.build_model("vim_fmnist")
    xc, _ = api.load_images("fashion-mnist", "train", 40, 0, model)
    xe, ye = api.load_images("fashion-mnist", "test", 60, 0, model)
    want = api.compare(model, xc, xe, ye, ["minmax"], [(4, 4)])
    for got, ref in zip(records, want):
        assert {k: got[k] for k in ("recipe", "top1", "top5", "agree")} == {
            k: ref[k] for k in ("recipe", "top1", "top5", "agree")
        }


def test_cli_failing_process_stops_the_other_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    port = _free_port()
    args = [*_fmnist_args(tmp_path), "--json", str(out)]
    procs = [_cli(0, port, args), _cli(1, port, [*args[:-2], "--data", str(tmp_path / "missing"), *args[-2:]])]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [rc for *_, rc in results] == [1, 1], [err[-2000:] for _, err, _ in results]
    assert "error (process 1 of 2):" in results[1][1]
    assert "error (process 0 of 2):" in results[0][1] and "another process" in results[0][1]
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "", "MASTER_ADDR": ""}, "RANK, MASTER_ADDR are not set"),
        ({"RANK": "2"}, "RANK=2 is outside 0..1"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"QMAMBA_AO_DIST_TIMEOUT": "soon"}, "QMAMBA_AO_DIST_TIMEOUT='soon'"),
    ],
)
def test_bad_launch_environment(env: dict, message: str) -> None:
    base = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(DistributedError, match=message.replace(".", r"\.").replace("(", r"\(")):
        with distributed.process_group_from_env({**base, **env}):
            pass


def test_a_process_that_never_arrives_times_out() -> None:
    env = {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "QMAMBA_AO_DIST_TIMEOUT": "2",
    }
    with pytest.raises(DistributedError, match="could not join the process group"):
        with distributed.process_group_from_env(env):
            pass
    assert not torch.distributed.is_initialized()
