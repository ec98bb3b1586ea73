"""Training/trainloop.py, the one loop every training script runs on: exact resume, early
stopping, best checkpoint, optional TensorBoard. A tiny model on the CPU, a few seconds."""
import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trainloop as tl


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
        self.drop = torch.nn.Dropout(0.3)  # draws from the global torch generator: resume must restore it

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def stream(gen: torch.Generator, rng: np.random.Generator):
    """Batches drawn from the two generators the loop saves and restores."""
    def start(step):
        while True:
            x = torch.randn(16, 4, generator=gen) + float(rng.normal())
            yield x, x.sum(1, keepdim=True)
    return start


def mse(net, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(net(x), y)


def setup(seed=3, lr=1e-2):
    tl.seed_everything(seed)
    net = Tiny()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    return net, opt, sched, gen, rng


def run(out, steps, resume=False, max_minutes=None, evaluate=None, **kw):
    net, opt, sched, gen, rng = setup()
    cfg = tl.LoopConfig(steps=steps, eval_every=kw.pop("eval_every", 4), max_minutes=max_minutes, **kw)
    state = tl.run_loop(net, opt, stream(gen, rng), mse, cfg, out, scheduler=sched, rng=rng, gen=gen,
                        evaluate=evaluate or (lambda n: tl.Evaluation(-float(mse(n, (torch.ones(2, 4), 4 * torch.ones(2, 1)))))),
                        resume=resume, log=lambda _: None)
    return net, state


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path):
    straight, s1 = run(tmp_path / "straight", 12)
    _, cut = run(tmp_path / "split", 12, max_minutes=0.0)  # stops after one step, last.pt written
    assert cut["step"] == 1 and cut["stopped"] == "time"
    _, cut = run(tmp_path / "split", 12, resume=True, stop_after=7)  # a second interruption, mid-evaluation
    assert cut["step"] == 7
    resumed, s2 = run(tmp_path / "split", 12, resume=True)
    assert s2["step"] == 12 and s2["epoch"] == s1["epoch"] == 3
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert [h["step"] for h in s2["history"]] == [4, 8, 12]
    assert json.loads(json.dumps(s2["history"]))  # plain data


def test_early_stopping_stops_at_the_patience(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.69, 0.9, 0.95])
    _, state = run(tmp_path, 100, evaluate=lambda n: tl.Evaluation(next(scores)), eval_every=2, patience=3)
    assert state["stopped"] == "patience"
    assert state["epoch"] == 5 and state["step"] == 10  # best at evaluation 2, then 3 without a better one
    assert state["best"] == 0.7 and state["best_epoch"] == 2 and state["best_step"] == 4


def test_best_checkpoint_holds_the_best_evaluation(tmp_path):
    scores = iter([0.1, 0.8, 0.3, 0.2])
    weights = {}

    def evaluate(net):
        score = next(scores)
        weights[score] = {k: v.clone() for k, v in net.state_dict().items()}
        return tl.Evaluation(score, record={"score": score})

    _, state = run(tmp_path, 8, evaluate=evaluate, eval_every=2)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["score"] == 0.8 and best["step"] == 4 and best["record"] == {"score": 0.8}
    assert all(torch.equal(best["model"][k], weights[0.8][k]) for k in weights[0.8])
    assert state["best"] == 0.8 and [h["score"] for h in state["history"]] == [0.1, 0.8, 0.3, 0.2]


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert tl.tensorboard_writer(tmp_path) is None
    _, state = run(tmp_path / "run", 4)
    assert state["step"] == 4 and not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_written_when_installed(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    run(tmp_path, 4)
    assert any((tmp_path / "tensorboard").iterdir())


def test_older_resume_states_are_read():
    knee = tl._upgrade_state({"iteration": 500, "epoch": 2, "best": 0.4, "best_epoch": 1, "history": [{}, {}]}, 250)
    assert knee["step"] == 500 and knee["best_epoch"] == 1
    levels = tl._upgrade_state({"epoch": 3, "best": 0.5, "best_epoch": 2, "history": [{}] * 3}, 40)
    assert levels["step"] == 120
    xray = tl._upgrade_state({"step": 60, "best": 0.9, "best_step": 30, "history": [{"step": 30}, {"step": 60}],
                              "seconds": 1.0}, 30)
    assert xray["epoch"] == 2 and xray["best_epoch"] == 1


def test_one_card_writer_lays_out_the_sections_and_publishes(tmp_path, monkeypatch):
    import modelcard
    from SpineKneeSegLib.engine.weights import resolve_weights, save_checkpoint, sha256_of
    from SpineKneeSegLib.tasks import TASKS

    text = modelcard.render("knee-bones v9.9.9 (starter)", [("Data", "- phantoms"), ("Known limits", "- all")],
                            intro="**Status: starter**")
    assert text.splitlines()[0] == "# Model card: knee-bones v9.9.9 (starter)"
    assert [line for line in text.splitlines() if line.startswith("## ")] == ["## Data", "## Known limits"]
    assert modelcard.table(["case", "dice"], [["a", 0.5], ["b", None]]).splitlines()[2:] == ["| a | 0.500 |",
                                                                                             "| b | — |"]
    monkeypatch.setenv("SPINEKNEESEG_MODELS", str(tmp_path))
    net = torch.nn.Conv2d(1, 1, 1)
    source = tmp_path / "run.pt"
    save_checkpoint(source, "knee-bones", "unet2d", {}, net.state_dict())
    entry = modelcard.publish("knee-bones", "9.9.9", text, "a test", source)
    assert (tmp_path / "knee-bones-9.9.9.md").read_text() == text
    assert entry.sha256 == sha256_of(tmp_path / "knee-bones-9.9.9.pt") and entry.card == "knee-bones-9.9.9.md"
    assert resolve_weights(TASKS["knee-bones"]).entry.version == "9.9.9"


# ---- data-parallel (issue 25, part 4): torchrun's processes, here two spawned with gloo on the CPU ----

def _tiny_net():
    torch.manual_seed(0)  # no batch norm: per-process statistics would differ from the whole batch's
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3, padding=1))


def _whole_batches(steps=3):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 1, 12, 12, generator=gen), torch.randn(8, 1, 12, 12, generator=gen)) for _ in range(steps)]


def _mse(net, batch):
    return torch.nn.functional.mse_loss(net(batch[0]), batch[1])


def _ddp_worker(rank, world, port, out):
    import os

    import torch.distributed as dist
    from trainloop import LoopConfig, init_distributed, run_loop

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    assert init_distributed() == (rank, world)
    net = _tiny_net()
    half = [(x[rank::world], y[rank::world]) for x, y in _whole_batches()]  # this process's share of each batch
    run_loop(net, torch.optim.SGD(net.parameters(), lr=0.1), iter(half), _mse,
             LoopConfig(steps=3, tensorboard=False), Path(out), log=lambda m: None)
    torch.save(net.state_dict(), Path(out) / f"rank{rank}.pt")
    _leave(dist)


def _leave(dist):
    """Both ranks done before either tears the group down, then out without the interpreter's
    finalisation: gloo's threads sometimes abort it (SIGABRT, 'terminate called without an active
    exception') after all the work is done, a torch teardown flake, not the loop's."""
    import os

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_data_parallel_averages_gradients_and_equals_one_process_on_the_whole_batch(tmp_path):
    import socket

    from trainloop import LoopConfig, run_loop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    single = _tiny_net()
    run_loop(single, torch.optim.SGD(single.parameters(), lr=0.1), iter(_whole_batches()), _mse,
             LoopConfig(steps=3, tensorboard=False), tmp_path / "single", log=lambda m: None)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    for name, value in single.state_dict().items():
        assert torch.allclose(ranks[0][name], ranks[1][name])  # the processes stay in step
        assert torch.allclose(ranks[0][name], value, atol=1e-6), name  # = one process on the whole batch
    untrained = _tiny_net().state_dict()
    assert any(not torch.allclose(untrained[k], v) for k, v in single.state_dict().items())
    saved = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)  # rank 0 wrote the checkpoint
    assert saved["state"]["step"] == 3 and len(saved["rank_rng"]) == 2


def test_shipping_lists_the_files_in_the_module_cmake(tmp_path):
    """A shipped model's weights and card go into the module's CMakeLists.txt resources (the Slicer
    build installs only those), after the model's older versions, once; a models folder outside a
    module (a test's, a site's) is left alone."""
    from modelcard import list_in_cmake

    models = tmp_path / "SpineKneeSeg" / "Resources" / "Models"
    models.mkdir(parents=True)
    cmake = tmp_path / "SpineKneeSeg" / "CMakeLists.txt"
    cmake.write_text("set(MODULE_PYTHON_RESOURCES\n  Resources/Models/lumbar-levels-0.3.0.pt\n"
                     "  Resources/Models/xray-chest-0.1.0.pt\n  Resources/Models/registry.json\n  )\n")
    new = [models / "lumbar-levels-0.4.0.pt", models / "lumbar-levels-0.4.0.md"]
    assert list_in_cmake(*new) == ["Resources/Models/lumbar-levels-0.4.0.md", "Resources/Models/lumbar-levels-0.4.0.pt"]
    assert list_in_cmake(*new) == []
    lines = cmake.read_text().splitlines()
    assert lines[1:4] == ["  Resources/Models/lumbar-levels-0.3.0.pt", "  Resources/Models/lumbar-levels-0.4.0.md",
                          "  Resources/Models/lumbar-levels-0.4.0.pt"]
    assert list_in_cmake(tmp_path / "elsewhere" / "m-1.0.0.pt") == []
    cmake.write_text("  Resources/Models/brain-wmh-0.3.0.pt\n  Resources/Models/brain-wmh-t1-0.1.0.pt\n"
                     "  Resources/Models/registry.json\n")
    list_in_cmake(models / "brain-wmh-0.4.0.pt")  # after brain-wmh's versions, not after brain-wmh-t1's
    assert cmake.read_text().splitlines()[1] == "  Resources/Models/brain-wmh-0.4.0.pt"


def _stream_check_worker(rank, world, port, out):
    """Under a real process group: rank_stream keeps rank 0's generator and gives rank 1 its own;
    run_loop notes whether the ranks drew distinct first batches, and warns when they did not."""
    import os

    import torch.distributed as dist
    from trainloop import LoopConfig, rank_stream, rank_torch_stream, run_loop

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    result = {}
    rng, gen = np.random.default_rng(11), torch.Generator().manual_seed(11)
    mine, mine_torch = rank_stream(rng, 11), rank_torch_stream(gen, 11)  # joins the group itself
    result["kept_own"] = [mine is rng, mine_torch is gen]
    for name, source in (("seeded", (mine, mine_torch)), ("same", (np.random.default_rng(11),
                                                                    torch.Generator().manual_seed(11)))):
        net, messages = _tiny_net(), []
        state = run_loop(net, torch.optim.SGD(net.parameters(), lr=0.1), stream(source[1], source[0]),
                         lambda n, b: n(b[0].view(-1, 1, 4, 4)).square().mean(), LoopConfig(steps=2, tensorboard=False),
                         None, log=messages.append)
        result[name] = [state["ranks_drew_distinct_batches"], any("same first batch" in m for m in messages)]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    _leave(dist)


def test_each_data_parallel_process_draws_its_own_batches(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_stream_check_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["kept_own"] == [True, True] and ranks[1]["kept_own"] == [False, False]
    assert ranks[0]["seeded"] == [True, False] and ranks[1]["seeded"] == [True, False]  # distinct, no warning
    assert ranks[0]["same"] == [False, True]  # rank 0 speaks for the run: the warning
    assert ranks[1]["same"] == [False, False]
