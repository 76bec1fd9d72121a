"""fastpurify.distributed: the one-process behaviour of the helpers, and the helpers under gloo
process groups of 2 and 3 CPU processes (tests/distributed/harness.py). Each gloo test spawns
fresh interpreters (a few seconds each), so each groups many checks in one rank function."""

import json

import pytest
import torch

from fastpurify import distributed as D
from fastpurify.validation import InputError

from .harness import RanksFailed, run_ranks
from .helper_ranks import dies, helpers, sleeps, stuck


@pytest.fixture
def ranks(monkeypatch):
    """Pretend to be rank ``r`` of ``w``: set(w, r)."""
    def pretend(w, r):
        monkeypatch.setattr(D, "world_size", lambda: w)
        monkeypatch.setattr(D, "rank", lambda: r)
    return pretend


def test_one_process_is_world_one(tmp_path):
    assert (D.world_size(), D.rank(), D.is_main()) == (1, 0, True)
    assert D.shard(5, "images") == slice(0, 5) and D.batch_shard(8) == slice(0, 8) and D.part_of(3) == slice(0, 3)
    t = torch.arange(3.0)
    assert D.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(3.0))
    assert D.broadcast_(t) is t and D.all_gather_rows(t, 3) is t
    D.barrier()
    D.check_agree({"n": 1, "eps": 0.4}, "settings")
    assert D.on_main(lambda x: x + 1, 6) == 7
    with pytest.raises(ValueError, match="read-only"):
        D.on_main(_raise, ValueError("read-only"))
    assert D.local_device(None) == torch.device("cpu") and D.local_device("cpu") == torch.device("cpu")
    D.shutdown()  # nothing to destroy


def test_init_from_environment_outside_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert D.init_from_environment() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_from_environment() is False  # torchrun with one process: nothing to join
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InputError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set: launch the processes "
                                         "with torchrun"):
        D.init_from_environment()
    for name, value in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match="timeout must be a finite number of seconds > 0, got 0"):
        D.init_from_environment(timeout_s=0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="WORLD_SIZE must be an integer, got 'two'"):
        D.init_from_environment()


def test_local_device_is_the_ranks_own_gpu_under_a_group(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.local_device(None) == torch.device("cuda", 1)
    assert D.local_device("cuda:0") == torch.device("cuda", 0)  # no group: as given
    monkeypatch.setattr(D, "_active", lambda: True)
    assert D.local_device("cuda") == torch.device("cuda", 1) and D.local_device("cuda:0") == torch.device("cuda", 1)
    assert D.local_device("cpu") == torch.device("cpu")  # a CPU run on a GPU machine stays on the CPU


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_parts_cover_every_item_once_in_rank_order(ranks, world):
    for n in range(0, 23):
        parts = []
        for r in range(world):
            ranks(world, r)
            parts.append(D.part_of(n))
            if n >= world:
                assert D.shard(n, "items") == parts[-1]
        assert [i for p in parts for i in range(n)[p]] == list(range(n))
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_errors_say_what_to_change(ranks):
    ranks(3, 1)
    with pytest.raises(InputError, match=r"batch_size 8 must be divisible by the world size 3: .*change batch_size to "
                                         r"a multiple of 3 \(e.g. 6 or 9\) or the number of processes"):
        D.batch_shard(8)
    with pytest.raises(InputError, match=r"batch_size 2 must be divisible by the world size 3: .*\(e.g. 3\)"):
        D.batch_shard(2)
    assert D.batch_shard(9) == slice(3, 6)
    with pytest.raises(InputError, match="the world size 3 is larger than the 2 images to score: every rank needs at "
                                         "least one"):
        D.shard(2, "images to score")
    with pytest.raises(InputError, match="the number of images must be an integer >= 0, got -1"):
        D.shard(-1, "images")
    with pytest.raises(InputError, match=r"rank 1 must hold its 2 of the 7 rows \(rows 3..4\) to gather, got a tensor "
                                         r"of shape \(7,\)"):
        D.all_gather_rows(torch.zeros(7), 7)


def test_a_collective_failure_is_a_distributed_error():
    def broken():
        raise RuntimeError("[pair.cc:553] Connection closed by peer")

    with pytest.raises(D.DistributedError, match=r"rank 0: all_reduce failed \(\[pair.cc:553\] Connection closed by "
                                                 r"peer\): another rank probably stopped with an error or timed out; "
                                                 r"see its output") as info:
        D._collective("all_reduce", broken)
    assert isinstance(info.value.__cause__, RuntimeError) and isinstance(info.value, RuntimeError)
    with pytest.raises(TypeError):  # not a collective failure: passed through
        D._collective("all_reduce", _raise, TypeError("bad argument"))


@pytest.mark.parametrize("world", [2, 3])
def test_the_helpers_under_a_gloo_group(world, tmp_path):
    answers = run_ranks(helpers, world, str(tmp_path), timeout_s=30)
    n_shards = {}
    for r, a in enumerate(answers):
        assert a["ids"] == (world, r, r == 0) and a["device"] == "cpu" and a["already"] is False
        for n, (start, stop) in a["shards"].items():
            n_shards.setdefault(n, []).append(range(start, stop))
        assert a["batch"] == (r * 6, (r + 1) * 6)
        kind, text = a["batch_error"]
        assert kind == "InputError" and f"batch_size {6 * world + 1} must be divisible by the world size {world}" \
            in text
        assert a["shard_error"] == ("InputError", f"the world size {world} is larger than the {world - 1} images to "
                                                  "score: every rank needs at least one; use fewer processes")

        expected = torch.tensor([1.5, -2.0, 0.375], dtype=torch.float64) * sum(range(1, world + 1))  # exact sums
        assert a["sum_in_place"] and a["sum"].dtype == torch.float64 and torch.equal(a["sum"], expected)

        full = torch.arange(21, dtype=torch.float64).reshape(7, 3) / 3
        g = a["gathered"]
        assert torch.equal(g["float64"], full) and torch.equal(g["columns"], full)
        assert g["float32"].dtype == torch.float32 and torch.equal(g["float32"], full.float())
        assert g["int64"].dtype == torch.int64 and torch.equal(g["int64"], torch.arange(7) * 10)
        assert g["bool"].dtype == torch.bool
        assert torch.equal(g["bool"], torch.tensor([True, False, False, True, True, False, True]))
        assert a["gather_error"][0] == "InputError" and f"rank {r} must hold its" in a["gather_error"][1]

        assert torch.equal(a["broadcast"], torch.full((2, 2), float(world - 1)))
        assert a["disagree"] == ("InputError", f"the ranks disagree on the ANP settings: rank(s) [{world - 1}] differ "
                                               f"from rank 0 (rank {world - 1}: seed=5 where rank 0 has seed=0); "
                                               "every rank must be given the same")

        assert a["on_main"] == (str(tmp_path / "out.txt") if r == 0 else None)
        assert a["written"] == "rank 0\n"  # written once, by rank 0, before any rank read it
        if r == 0:  # rank 0 raises its own error; the others learn of it instead of waiting
            assert a["on_main_error"] == ("ValueError", "the output folder is read-only")
        else:
            assert a["on_main_error"] == ("DistributedError", f"rank {r}: rank 0 failed in _fail (ValueError: the "
                                                              "output folder is read-only); see its output")

        reinit = a["reinit"]
        assert reinit["made"] is True and reinit["world"] == world and reinit["after"] == (1, 0)
        assert "timeout (30 s here;" in reinit["message"]
    for n, pieces in n_shards.items():
        assert [i for p in pieces for i in p] == list(range(n)), n  # contiguous, in rank order, each item once


def test_a_stuck_rank_makes_the_others_time_out_with_a_distributed_error():
    timeout = 5.0
    with pytest.raises(RanksFailed) as info:
        run_ranks(stuck, 2, timeout + 1, timeout_s=timeout, deadline_s=60)
    message = str(info.value)
    assert "1 of 2 rank(s) failed" in message and "--- rank 1 ---" in message
    assert "ValueError: rank 1 gives up" in message  # the failed rank's own traceback
    assert info.value.failures.keys() == {1}
    answers = info.value.results[0]
    text, seconds, cause = answers["all_reduce"]  # rank 1 alive but elsewhere: the group's timeout
    assert text.startswith("rank 0: all_reduce failed (") and "Timed out" in text and cause == "RuntimeError"
    assert "another rank probably stopped with an error or timed out; see its output" in text
    assert "Collectives time out after the process group's timeout (5 s here;" in text
    assert timeout - 0.5 < seconds < timeout + 3
    text, seconds, _ = answers["barrier"]  # gloo closes the group's connections at a timeout: fails at once
    assert text.startswith("rank 0: barrier failed (") and seconds < 1


def test_a_dead_rank_makes_the_others_fail_at_once_with_a_distributed_error():
    with pytest.raises(RanksFailed) as info:
        run_ranks(dies, 3, timeout_s=30, deadline_s=60)
    assert info.value.failures.keys() == {2} and "exited with code 3 without a result" in info.value.failures[2]
    for r in (0, 1):
        text, seconds, cause = info.value.results[r]
        assert text.startswith(f"rank {r}: all_reduce failed (") and "another rank probably stopped" in text
        assert cause == "RuntimeError" and seconds < 10  # long before the 30 s timeout


def test_the_harness_reports_and_kills_a_rank_past_the_deadline():
    with pytest.raises(RanksFailed, match=r"(?s)--- rank 0 ---\nstill running at the deadline of 2 s \(killed\)"):
        run_ranks(sleeps, 1, deadline_s=2)
    with pytest.raises(TypeError, match="module-level function"):
        run_ranks(lambda r, w: None, 1)
    # what a may-fail rank gives back: its failure's text
    assert run_ranks(sleeps, 1, deadline_s=1, may_fail=frozenset({0}))[0].startswith("still running at the deadline")


def _raise(err):
    raise err


def test_check_agree_compares_canonical_json():
    assert D._canonical({"b": (1, 2), "a": 1.0}) == json.dumps({"a": 1.0, "b": [1, 2]})
    assert D._canonical({"device": torch.device("cpu")}) == '{"device": "device(type=\'cpu\')"}'
