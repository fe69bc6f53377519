"""Two processes (torchrun, gloo) score and prune exactly like one: same scores, same surgery."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import models
import ptl_common
from conftest import assert_trained_alike, logits, padded_batch

ROOT = Path(__file__).resolve().parents[1]


def one_and_two_processes(flags: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """ptl.py with `flags` in one process and under torchrun with two (gloo); -> their two --out directories."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "ptl.py", *flags, "--out", str(one)], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "ptl.py", *flags, "--out", str(two)], cwd=ROOT, check=True)
    return one, two


@pytest.mark.parametrize("rule", ["eq4", "released", "taylor"])
def test_two_ranks_score_and_prune_like_one(rule, tiny_dirs, tmp_path):
    flags = ["--model", tiny_dirs["gemma2"], "--calib-samples", "14", "--max-length", "48", "--batch-size", "2",
             "--rounds", "2", "--order", "alternate", "--layer-target", "1", "--neuron-rule", rule]
    one, two = one_and_two_processes(flags, tmp_path)
    for t in (1, 2):
        a, b = (load_file(d / f"round_{t}" / "scores.safetensors") for d in (one, two))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        ra, rb = (ptl_common.load_record(d / f"round_{t}") for d in (one, two))
        assert (ra["removed_neurons"], ra["removed_layers"]) == (rb["removed_neurons"], rb["removed_layers"])
    a, b = (load_file(d / "round_2" / "model.safetensors") for d in (one, two))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_prune_and_recover_like_one(fsdp, tiny_dirs, tmp_path):
    cpt = "--samples 24 --max-length 32 --global-batch 4 --micro-batch 1 --lr 1e-3 --max-steps 3" + " --fsdp" * fsdp
    flags = ["--model", tiny_dirs["llama"], "--calib-samples", "8", "--max-length", "48", "--rounds", "2",
             "--recovery", "cpt", "--cpt-flags", cpt]
    one, two = one_and_two_processes(flags, tmp_path)
    ra, rb = (ptl_common.load_record(d / "round_2") for d in (one, two))
    assert ra["removed_neurons"] == rb["removed_neurons"] and rb["recovery"]["cpt"]["world"] == 2
    for t in (1, 2):  # every step's all-reduced loss matches the single-process loss
        la, lb = ([r["loss"] for _, r in data.read_jsonl(d / f"round_{t}" / "cpt_metrics.jsonl")]
                  for d in (one, two))
        assert la == pytest.approx(lb, rel=1e-5) and len(la) == 3
    a, b = (load_file(d / "round_2" / "model.safetensors") for d in (one, two))
    assert_trained_alike(a, b, lr=1e-3, steps=2 * 3)


@pytest.mark.parametrize("rule", ["ppl", "taylor"])
def test_two_ranks_rank_layers_like_one_with_the_whole_model_criteria(rule, tiny_dirs, tmp_path):
    flags = ["--model", tiny_dirs["llama"], "--calib-samples", "10", "--max-length", "48", "--batch-size", "2",
             "--rounds", "1", "--order", "lay-neu", "--layer-target", "1", "--target-ratio", "0", "--layer-rule", rule]
    one, two = one_and_two_processes(flags, tmp_path)
    a, b = (load_file(d / "round_1" / "scores.safetensors")["layer_scores"] for d in (one, two))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    ra, rb = (ptl_common.load_record(d / "round_1") for d in (one, two))
    assert ra["removed_layers"] == rb["removed_layers"]


def test_two_ranks_slice_like_one(tiny_dirs, tmp_path):
    flags = ["--model", tiny_dirs["qwen2"], "--baseline", "slicegpt", "--target-ratio", "0.2", "--calib-samples", "14",
             "--max-length", "48", "--batch-size", "2"]
    one, two = one_and_two_processes(flags, tmp_path)
    a, b = (load_file(d / "round_1" / "scores.safetensors")["pca_eigenvalues"] for d in (one, two))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # the covariances are summed over ranks
    batch = padded_batch(0)  # an eigenvector's sign is arbitrary, so compare what the two models compute
    x, y = (logits(models.load_model(str(d / "round_1"), attn="eager")[0], batch) for d in (one, two))
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def _load_damaged(rank: int, path: str, init: str) -> None:
    import torch.distributed as dist

    import trainer
    from conftest import tiny_model

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = tiny_model("llama", layers=1)
    try:
        trainer.load_state(Path(path), model, torch.optim.AdamW(model.parameters()))
    except ValueError as e:
        (Path(path) / f"rank{rank}.txt").write_text(str(e))


def test_a_damaged_resume_state_stops_every_rank_with_the_same_error(tmp_path):
    """Only rank 0 reads state.pt: its error must reach rank 1, which would otherwise wait in the broadcast."""
    import multiprocessing

    (tmp_path / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_load_damaged, args=(r, str(tmp_path), f"file://{tmp_path / 'init'}"))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        p.kill()
    said = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else None for r in (0, 1)]
    assert said[0] and said[0] == said[1] and "state.pt is damaged" in said[0], said
