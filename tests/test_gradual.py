"""The gradual-vs-once experiment (scripts/gradual.py, gradual_stats.py): the driver end to end on a tiny model,
and the statistics against hand-computed goldens."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gradual  # noqa: E402
import gradual_stats  # noqa: E402


def tiny(tmp_path, model, **kw) -> gradual.Config:
    return gradual.Config(**{**dict(
        out=str(tmp_path / "out"), results=str(tmp_path / "results"), model=model, dense_samples=24,
        dense_batch=2, snapshot_every=12, sizes="0.45", curve_size=0.45, layer_target=1, neuron_step=0.25, budget=12,
        curve_budgets="6", seeds="1,2", curve_seeds="2", baseline_size=0.45, baseline_seeds="1,2", decompose_size=0.45,
        recovery_batch=2, micro_batch=2,
        max_length=48,
        calib_samples=4, eval_n=5, curve_eval_n=3, max_new_tokens=3, eval_batch=5, in_process=True), **kw})


def test_the_experiment_runs_end_to_end_on_a_tiny_model_and_its_results_recompute_the_table(tmp_path, tiny_dirs):
    cfg = tiny(tmp_path, tiny_dirs["llama"])
    res = gradual.main(cfg)
    cells = res["cells"]
    steps = json.loads((Path(cfg.out) / "dense" / "train_summary.json").read_text())["steps"]
    snapshots = {f"dense-step{k}" for k in range(0, steps, 12)}
    baselines = {f"{m}-45-b12-s{s}" for m in ("taylor", "slicegpt", "shortgpt") for s in (1, 2)}
    arms = {f"{m}-45-b12-s{s}" for m in ("ptl", "ptlc", "once", "sel", "nor") for s in (1, 2)}
    assert set(cells) == {"dense", *snapshots, *arms, "once-45-b0-s1", "once-45-b0-s2", "ptl-45-b0-s2", "ptl-45-b6-s2",
                          "once-45-b6-s2", *baselines}
    for name in baselines:  # one cut, the same recovery texts as PTL, at most PTL's size (the same for taylor)
        b, p = cells[name], cells["ptl-45-b12-s" + name[-1]]
        assert b["rounds"] == 1 and b["train_tokens"] == p["train_tokens"] and b["problems"] == p["problems"]
        assert b["params"]["total"] <= p["params"]["total"] if "taylor" not in name else b["params"] == p["params"]
    assert cells["slicegpt-45-b12-s1"]["hidden"] < cells["dense"]["hidden"]
    for s in (1, 2):  # the decomposition: sel cuts continuous PTL's units at once, nor PTL's unrecovered rounds'
        c, sel, nor, once = (cells[f"{m}-45-b12-s{s}"] for m in ("ptlc", "sel", "nor", "once"))
        assert (sel["removed_layers"], sel["removed_neurons"]) == (c["removed_layers"], c["removed_neurons"])
        assert c["rounds"] > 1 and sel["rounds"] == nor["rounds"] == 1 and sel["params"] == nor["params"] == c["params"]
        assert c["train_tokens"] == sel["train_tokens"] == nor["train_tokens"] == once["train_tokens"]
        assert len(c["removed_layers"]) == 1 and len(c["removed_neurons"]) == 3
    sel_row = next(line for line in res["markdown"].splitlines() if line.startswith("| 45% | PTL's units, one cut ("))
    assert sel_row.endswith("| 1.000 |"), "sel removed exactly continuous PTL's neurons"
    for name, p in cells.items():
        if p["method"] in ("ptl", "ptlc"):
            o = cells[name.replace(p["method"], "once", 1)]
            assert p["params"] == o["params"] and p["rounds"] > 1 and o["rounds"] == 1, "one architecture"
            assert p["problems"] == o["problems"] == cells["dense"]["problems"] and p["n"] == 5, "paired"
            assert p["train_tokens"] == o["train_tokens"] and (p["train_tokens"] > 0) == (p["budget"] > 0), \
                "the same recovery tokens"
    assert cells["dense-step12"]["n"] == 3 and cells["dense-step12"]["problems"] == cells["dense"]["problems"][:3]
    ptl_run, once = Path(cfg.out) / "ptl-45-b12-s1", Path(cfg.out) / "once-45-b12-s1"
    rounds = cells["ptl-45-b12-s1"]["rounds"]
    recs = [json.loads((ptl_run / f"round_{t}" / "ptl_record.json").read_text()) for t in range(1, rounds + 1)]
    rows = [r["recovery"]["cpt"]["rows"] for r in recs]
    assert rows == [[12 // rounds * t, 12 // rounds * (t + 1)] for t in range(rounds)], "budget / rounds each"
    assert json.loads((once / "round_1" / "ptl_record.json").read_text())["recovery"]["cpt"]["rows"] == [0, 12]
    assert (ptl_run / f"round_{rounds}" / "model.safetensors").exists(), "the final model is kept"
    assert not (ptl_run / "round_1" / "model.safetensors").exists(), "earlier rounds keep their records only"
    again = gradual_stats.main(gradual_stats.Config(results=cfg.results))
    assert again["markdown"] == res["markdown"], "the committed results alone recompute every number"
    assert (Path(cfg.results) / "budget_curve.png").stat().st_size > 1000
    diffs = [line.split(" | ")[1:3] for line in res["markdown"].splitlines()
             if line.startswith("| 45% | ") and "| PTL − Prune-Once |" in line]
    assert diffs == [["12 texts", "2"], ["6 texts", "1"], ["no recovery", "1"]]


def test_a_finished_cell_is_skipped_and_one_made_with_other_settings_is_refused(tmp_path, tiny_dirs):
    cfg = tiny(tmp_path, tiny_dirs["llama"], curve_budgets="", seeds="1", baselines="")
    first = gradual.main(gradual.Config(**{**vars(cfg), "cell": "ptl-45-b12-s1"}))["cells"]
    assert set(first) == {"dense", "ptl-45-b12-s1"}, "one cell on its own, after the dense model it starts from"
    path = Path(cfg.results) / "ptl-45-b12-s1.json"  # written before --seeds chose cells rather than settings
    path.write_text(json.dumps({**first["ptl-45-b12-s1"], "settings": {**first["ptl-45-b12-s1"]["settings"],
                                                                        "seeds": "1,2,3"}}))
    again = gradual.main(gradual.Config(**{**vars(cfg), "cell": "ptl-45-b12-s1"}))["cells"]
    assert again["ptl-45-b12-s1"]["correct"] == first["ptl-45-b12-s1"]["correct"]
    with pytest.raises(ValueError, match="other settings.*recovery_lr"):
        gradual.main(gradual.Config(**{**vars(cfg), "cell": "ptl-45-b12-s1", "recovery_lr": 3e-4}))
    with pytest.raises(ValueError, match="no such cell"):
        gradual.main(gradual.Config(**{**vars(cfg), "cell": "ptl-45-b13-s1"}))
    with pytest.raises(ValueError, match="multiples of"):
        gradual.main(gradual.Config(**{**vars(cfg), "budget": 13}))


@pytest.mark.parametrize("b, c, p", [(0, 0, 1.0), (5, 5, 1.0), (0, 5, 2 / 32), (1, 9, 22 / 1024), (9, 1, 22 / 1024)])
def test_mcnemar_exact_p_values_are_the_two_sided_binomial_tail(b, c, p):
    assert gradual_stats.mcnemar_exact(b, c) == pytest.approx(p)


def test_jaccard_overlap_counts_removed_neurons_of_the_layers_both_keep():
    a = {"removed_neurons": {"0": [1, 2], "1": [3]}}
    b = {"removed_neurons": {"0": [2, 4], "2": [5]}}  # layer 1 and 2: each removed by the other
    assert gradual_stats.jaccard(a, b) == pytest.approx(1 / 3) and gradual_stats.jaccard(a, a) == 1.0


def test_the_seed_level_interval_is_the_t_interval_over_per_seed_means():
    lo, hi = gradual_stats.seed_interval(np.array([1.0, 2.0, 3.0]))  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert (lo, hi) == pytest.approx((2 - 4.3027 / math.sqrt(3), 2 + 4.3027 / math.sqrt(3)), abs=1e-4)
    assert all(math.isnan(x) for x in gradual_stats.seed_interval(np.array([1.0])))
    spread = np.array([0.0, 2.3 * math.sqrt(2)])  # sd 2.3: 4 seeds give +-3.66, 5 give +-2.86 (t 3.18, 2.78)
    assert spread.std(ddof=1) == pytest.approx(2.3) and gradual_stats.seeds_for(spread, 3.0) == 5


def test_the_hierarchical_bootstrap_sees_seed_noise_and_problem_noise_within_each_seed():
    constant = np.full((3, 50), 2.0)
    assert gradual_stats.hierarchical_bootstrap(constant, 200) == (2.0, 2.0), "no spread, no interval"
    seeds_only = np.repeat([[0.0], [1.0], [2.0]], 50, axis=1)  # seeds disagree, problems do not
    lo, hi = gradual_stats.hierarchical_bootstrap(seeds_only, 2000)
    assert lo < 0.6 and hi > 1.4
    rng = np.random.default_rng(1)
    problems_only = np.tile(rng.choice([-1.0, 0.0, 1.0], 400), (3, 1))  # one per-problem pattern for every seed
    lo, hi = gradual_stats.hierarchical_bootstrap(problems_only, 2000)
    half = 1.96 * problems_only[0].std() / math.sqrt(3 * 400)  # problems drawn afresh within each of 3 seeds
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    one = gradual_stats.problem_half_width(problems_only, 2000)  # within one seed: sqrt(3) wider
    assert one == pytest.approx(1.96 * problems_only[0].std() / math.sqrt(400), rel=0.15)


@pytest.mark.parametrize("results", ["gradual", "gradual-first-dense", "gradual-step8", "gradual-step8-amd"])
def test_the_experiment_tables_are_what_the_committed_results_give(results, tmp_path):
    """Every table row of docs/gradual.md is recomputed from results/<dir>/*.json (a copy: table.md stays as it is)."""
    import shutil

    for f in (ROOT / "results" / results).glob("*.json"):
        shutil.copy(f, tmp_path)
    md = gradual_stats.main(gradual_stats.Config(results=str(tmp_path), reps=10000))["markdown"]
    doc = (ROOT / "docs" / "gradual.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) >= 8 and [r for r in rows if r not in doc] == []


def test_pooled_comparisons_pair_within_each_dense_model_and_count_every_run_as_a_unit(tmp_path):
    """--pool: the per-run differences are each directory's own, side by side; the interval is over all of them."""
    import shutil

    dirs = []
    for name in ("gradual", "gradual-first-dense"):
        (tmp_path / name).mkdir()
        for f in (ROOT / "results" / name).glob("*.json"):
            shutil.copy(f, tmp_path / name)
        dirs.append(tmp_path / name)
    each = [gradual_stats.main(gradual_stats.Config(results=str(d), reps=200)) for d in dirs]
    out = gradual_stats.main(gradual_stats.Config(results=str(dirs[0]), pool=str(dirs[1]), reps=200))

    def ptl_once(comps):
        return next(c for c in comps if (c["a"], c["b"], c["size"], c["budget"]) == ("ptl", "once", 0.3, 560))
    per = ptl_once(each[0]["comparisons"])["acc_per_seed"] + ptl_once(each[1]["comparisons"])["acc_per_seed"]
    both = ptl_once(out["comparisons"])
    assert both["acc_per_seed"] == pytest.approx(per) and len(both["seeds"]) == 6
    assert both["acc_ci"] == pytest.approx(gradual_stats.seed_interval(np.array(per)))
    assert (dirs[0] / "pooled.md").read_text() in out["markdown"]


def test_the_pooled_step8_table_is_what_the_committed_results_give(tmp_path):
    """docs/gradual.md's pooled rows over both step-8 dense models, recomputed from copies of their results."""
    import shutil

    dirs = [tmp_path / d for d in ("gradual-step8", "gradual-step8-amd")]
    for d in dirs:
        d.mkdir()
        for f in (ROOT / "results" / d.name).glob("*.json"):
            shutil.copy(f, d)
    out = gradual_stats.main(gradual_stats.Config(results=str(dirs[0]), pool=str(dirs[1]), reps=10000))
    rows = [line for line in (dirs[0] / "pooled.md").read_text().splitlines() if line.startswith("| ")]
    doc = (ROOT / "docs" / "gradual.md").read_text()
    assert len(rows) >= 6 and [r for r in rows if r not in doc] == [] and out["comparisons"]
