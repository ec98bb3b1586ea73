"""Knee-bones weight averaging: SWA of one run's snapshots (``average``) and a model soup of runs
of one recipe that differ only in seed (``soup``); batch norm re-estimated on synthetic batches."""
from __future__ import annotations

from pathlib import Path

import torch
from knee_data import TASK, Config, load_volumes, random_crop
from knee_synth import SynthConfig, synthesise_batch
from knee_train import network_config
from SpineKneeSegLib.engine.models import build_network

def _averaged_network(ckpts: list[dict], volumes_path: Path, bn_batches: int):
    """Uniform weight average of checkpoints of one network -> (network, its Config, the last one's
    metadata). Batch-norm statistics are re-estimated on ``bn_batches`` fresh synthetic training
    batches (the checkpoints' own synthesis and training anatomies; fixed seed)."""
    from torch.optim.swa_utils import update_bn

    meta = dict(ckpts[-1]["metadata"])
    cfg = Config(**{k: v for k, v in meta["config"].items() if k in Config.__dataclass_fields__})
    state = {k: (sum(c["state_dict"][k].double() for c in ckpts) / len(ckpts)).to(v.dtype)
             if v.is_floating_point() else v for k, v in ckpts[-1]["state_dict"].items()}
    net = build_network("unet2d", network_config(cfg))
    net.load_state_dict(state)
    volumes = [v for v in load_volumes(volumes_path) if v.name in meta["trained_on"]]
    gen = torch.Generator().manual_seed(4242)
    synth = SynthConfig(**cfg.synth)
    batches = [random_crop(*synthesise_batch(volumes, synth, gen, cfg.batch_size), cfg.patch, gen)[0]
               for _ in range(bn_batches)]
    with torch.random.fork_rng():  # update_bn runs in train mode: seed the dropout too, so averaging repeats exactly
        torch.manual_seed(4242)
        update_bn(batches, net)
    return net, cfg, meta


def _save_averaged(out: Path, net, cfg: Config, meta: dict) -> None:
    from SpineKneeSegLib.engine.weights import save_checkpoint

    model = "fibula" if cfg.variant == "fibula" else "labels"
    save_checkpoint(out, TASK, "unet2d", network_config(cfg), {k: v.cpu() for k, v in net.state_dict().items()},
                    metadata=meta, model=model)


def average_snapshots(run: Path, first: int, last: int, bn_batches: int = 50, log=print,
                      volumes_path: Path | None = None) -> Path:
    """Stochastic weight averaging (Izmailov et al., UAI 2018) of a run's snapshots ``first``..``last``
    -> RUN/swa-FIRST-LAST.pt: one model from the many that the noisy late schedule visits."""
    paths = [p for p in sorted((run / "snapshots").glob("iter-*.pt")) if first <= int(p.stem[5:]) <= last]
    if len(paths) < 2:
        raise SystemExit(f"need at least two snapshots in {run / 'snapshots'} between {first} and {last}")
    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    net, cfg, meta = _averaged_network(ckpts, volumes_path or run / "volumes.pt", bn_batches)
    meta["swa"] = {"first": int(paths[0].stem[5:]), "last": int(paths[-1].stem[5:]), "snapshots": len(paths),
                   "bn_batches": bn_batches}
    out = run / f"swa-{first}-{last}.pt"
    _save_averaged(out, net, cfg, meta)
    log(f"averaged {len(paths)} snapshots ({paths[0].stem}..{paths[-1].stem}) -> {out}")
    return out


SOUP_MAY_DIFFER = {"seed"}  # runs of one recipe: only this Config field may differ


def soup_checkpoints(paths: list[Path], out: Path, volumes_path: Path, bn_batches: int = 50, log=print) -> Path:
    """Uniform weight average of the candidates of several runs of one recipe that differ only in their
    random seed (a "model soup", Wortsman et al., ICML 2022; the runs share their initialisation, so
    their weights average). Smooths out the run-to-run spread that a single CPU run carries."""
    if len(paths) < 2:
        raise SystemExit("soup: give at least two checkpoints")
    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    configs = [{k: v for k, v in c["metadata"]["config"].items() if k not in SOUP_MAY_DIFFER} for c in ckpts]
    for p, c, cfg in zip(paths, ckpts, configs):
        differ = sorted(k for k in set(cfg) | set(configs[0]) if cfg.get(k) != configs[0].get(k))
        if differ or c["metadata"]["trained_on"] != ckpts[0]["metadata"]["trained_on"]:
            raise SystemExit(f"soup: {p} is not a run of the same recipe as {paths[0]} "
                             f"(differs in {', '.join(differ) or 'training anatomies'})")
    net, cfg, meta = _averaged_network(ckpts, volumes_path, bn_batches)
    meta.pop("swa", None)
    meta["soup"] = {"bn_batches": bn_batches, "runs": [
        {"file": f"{p.parent.name}/{p.name}", "seed": c["metadata"]["config"]["seed"],
         "iteration": c["metadata"]["iteration"], "swa": c["metadata"].get("swa")} for p, c in zip(paths, ckpts)]}
    _save_averaged(out, net, cfg, meta)
    log(f"averaged {len(paths)} runs' checkpoints (seeds {', '.join(str(r['seed']) for r in meta['soup']['runs'])})"
        f" -> {out}")
    return out

