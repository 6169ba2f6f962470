"""The comparison of training methods over seeds (diffdis.experiments, diffdis.cli.compare, tools/compare.py): arm
parsing and validation, aggregation, the table and JSON, reuse of finished runs, the cost keys of train_summary.json,
and one end-to-end run of two arms x two seeds."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffdis.cli import compare as cli
from diffdis.experiments import Arm, CompareError, CompareSettings, aggregate, arms_from_file, parse_arm, split_overrides
from diffdis.experiments import compare as lib
from diffdis.experiments.report import table, write_outputs

SMALL_EVAL = ("--fid-images 12 --adherence-per-combo 1 --zeroshot-samples 12 --retrieval-samples 8 --steps 2 "
              "--zs-steps 2 --batch-size 16 --reference-steps 20 --device cpu")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIFFDIS_CACHE", str(tmp_path_factory.getbasetemp() / "diffdis_cache"))


# ---------------------------------------------------------------------------- arms
def test_parse_arm():
    assert parse_arm("gen_only") == Arm("gen_only", ("method=gen_only",))
    arm = parse_arm("lam0.1:method=diffdis,loss.lambda_ita=0.1,model.unet.block_out_channels=[16,32]")
    assert arm.name == "lam0.1" and arm.dirname == "lam0.1"
    assert arm.overrides == ("method=diffdis", "loss.lambda_ita=0.1", "model.unet.block_out_channels=[16,32]")
    assert split_overrides("a='x,y',b={c: 1, d: 2}") == ["a='x,y'", "b={c: 1, d: 2}"]
    for bad, message in (("a b", "names a folder"), ("x:method", "not key=value"), ("x:", "not key=value"),
                         ("../up:method=diffdis", "names a folder")):
        with pytest.raises(CompareError, match=message):
            parse_arm(bad)


def test_arms_from_file(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text("arms:\n  diffdis: {method: diffdis}\n  gen_only: [method=gen_only]\n"
                    "  lam0.1: {method: diffdis, loss: {lambda_ita: 0.1}, model.unet.block_out_channels: [16, 32]}\n")
    arms = arms_from_file(path)
    assert [a.name for a in arms] == ["diffdis", "gen_only", "lam0.1"]
    assert arms[1].overrides == ("method=gen_only",)
    assert arms[2].overrides == ('method="diffdis"', "loss.lambda_ita=0.1", "model.unet.block_out_channels=[16, 32]")
    from diffdis.experiments import validate_arms

    configs = validate_arms(arms, None, [])  # the JSON-written values read back as they were
    assert configs["lam0.1"].loss.lambda_ita == 0.1 and list(configs["lam0.1"].model.unet.block_out_channels) == [16, 32]
    assert configs["lam0.1"].method == "diffdis" and configs["gen_only"].method == "gen_only"
    path.write_text("arms: [diffdis]\n")
    with pytest.raises(CompareError, match="mapping"):
        arms_from_file(path)
    with pytest.raises(CompareError, match="does not exist"):
        arms_from_file(tmp_path / "missing.yaml")


def test_default_arms_are_the_registered_methods():
    from diffdis.experiments import default_arms
    from diffdis.methods import available

    arms = default_arms()
    assert sorted(a.name for a in arms) == sorted(m for m in available() if m != "prior")  # a prior needs a CLIP folder
    names = [a.name for a in arms]
    for arm in arms:
        if arm.name == "rleg":  # reads the diffdis arm's model of the same seed, so it comes after it
            assert arm.overrides == ("method=rleg", "model.rleg.generator={run:diffdis}")
            assert names.index("rleg") == names.index("diffdis") + 1
        else:
            assert arm.overrides == (f"method={arm.name}",)


def test_run_references_resolve_to_the_earlier_arms_model_of_the_same_seed(tmp_path):
    from diffdis.experiments import validate_arms

    arms = [parse_arm("diffdis"), parse_arm("rleg:method=rleg,model.rleg.generator={run:diffdis}")]
    settings = CompareSettings(arms=arms, train_command=["x"], seeds=[3])
    args = lib.train_overrides(settings, arms[1], 3, tmp_path / "rleg" / "seed3", tmp_path)
    assert f"model.rleg.generator={tmp_path / 'diffdis' / 'seed3' / 'model'}" in args
    assert "model.rleg.generator={run:diffdis}" in lib.train_overrides(settings, arms[1], 3, tmp_path / "r")  # as written
    assert validate_arms(arms, None, [])["rleg"].model.rleg.generator == "diffdis/seed0/model"
    for bad, message in (([arms[1], arms[0]], "'diffdis' must be listed before it"), ([arms[1]], "'diffdis' is not an arm")):
        with pytest.raises(CompareError, match=message):
            validate_arms(bad, None, [])


@pytest.mark.parametrize("argv, message", [
    (["--arm", "nope"], "arm 'nope': method='nope' is not one of"),
    (["--arm", "a:method=diffdis,train.max_stepz=3"], "arm 'a': invalid config key 'train.max_stepz'"),
    (["--arm", "a:method=diffdis", "--arm", "a:method=gen_only"], "given twice"),
    (["--arm", "a:train.seed=3"], "set per run"),
    (["--arm", "diffdis", "train.output_dir=/tmp/x"], "set per run"),
    (["--arm", "diffdis", "--seeds", "0", "x"], "--seeds takes integers"),
    (["--arm", "diffdis", "--eval-args=--bogus"], "unrecognized arguments: --bogus"),
    (["--arm", "diffdis", "--num-processes", "0"], "--num-processes"),
    (["--arm", "diffdis", "--jobs", "0"], "--jobs must be at least 1"),
    (["--arm", "diffdis", "train.max_steps=0"], "max_steps"),
])
def test_bad_input_is_one_line_and_trains_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_evaluation_args():
    from diffdis.cli.options import parse_evaluation_args
    from diffdis.eval.api import EvaluationError

    options = parse_evaluation_args("--quick --skip retrieval --zs-steps 3")
    assert options.sizes.fid_images == 500 and "retrieval" not in options.parts and options.zeroshot.steps == 3
    with pytest.raises(EvaluationError, match="--zs-steps must be >= 1"):
        parse_evaluation_args("--zs-steps 0")
    options = parse_evaluation_args("--dc-keep 5 --dc-first-timesteps 3")
    assert (options.zeroshot.dc_keep, options.zeroshot.dc_first_timesteps) == (5, 3)
    assert parse_evaluation_args("").zeroshot.dc_keep is None  # every class at every timestep unless asked
    assert parse_evaluation_args("--quick").zeroshot.dc_keep == 5  # --quick: the two-round classifier
    assert parse_evaluation_args("--preset quick").zeroshot.dc_keep == 5
    assert parse_evaluation_args("--quick --dc-keep 0").zeroshot.dc_keep is None  # 0: every class
    with pytest.raises(EvaluationError, match="--dc-keep must be >= 0"):
        parse_evaluation_args("--dc-keep -1")
    with pytest.raises(EvaluationError, match="--dc-first-timesteps must be between 1 and --dc-timesteps"):
        parse_evaluation_args("--dc-timesteps 4 --dc-first-timesteps 5")
    one = parse_evaluation_args("--quick --dc-timesteps 1").zeroshot  # fewer timesteps than the default first round
    assert (one.dc_timesteps, one.dc_first_timesteps) == (1, 1)


# ---------------------------------------------------------------------------- aggregation and outputs
def fabricated_runs():
    """Two diffdis runs, one gen_only run (no retrieval) and a failed gen_only run."""
    def run(arm, seed, acc, fid, extra=None, status="ok"):
        metrics = {"shape/acc1": acc, "fid": fid, **(extra or {})}
        return {"arm": arm, "seed": seed, "status": status, "error": None if status == "ok" else "boom",
                "metrics": metrics if status == "ok" else {}, "steps": 4,
                "cost": {"ms_per_step": 10.0 * (seed + 1), "trainable_parameters": 2_000_000, "peak_cuda_memory_mb": None}}

    return [run("diffdis", 0, 0.5, 10.0, {"retrieval/image_retrieval_recall@1": 0.2}),
            run("diffdis", 1, 0.7, 14.0, {"retrieval/image_retrieval_recall@1": 0.4}),
            run("gen_only", 0, 0.3, 12.0), run("gen_only", 1, 0.9, 1.0, status="failed")]


def test_aggregate_mean_std_n():
    stats = aggregate(fabricated_runs(), ["diffdis", "gen_only", "disc_only"])
    d = stats["diffdis"]
    assert d["shape/acc1"]["mean"] == pytest.approx(0.6) and d["shape/acc1"]["n"] == 2
    assert d["shape/acc1"]["std"] == pytest.approx(math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1))  # sample std
    assert d["fid"] == {"mean": 12.0, "std": pytest.approx(math.sqrt(8.0)), "n": 2}
    assert d["ms_per_step"]["mean"] == 15.0 and d["steps"]["mean"] == 4.0
    g = stats["gen_only"]  # the failed run is left out; a single run has std 0
    assert g["shape/acc1"] == {"mean": 0.3, "std": 0.0, "n": 1}
    assert "retrieval/image_retrieval_recall@1" not in g and "peak_cuda_memory_mb" not in g
    assert stats["disc_only"] == {}


def test_table_and_json_layout(tmp_path):
    runs = fabricated_runs()
    arms = ["diffdis", "gen_only"]
    result = {"command": "diffdis-compare --seeds 0 1", "commit": "abc", "runs": runs, "failed": 1, "minutes": 0.1,
              "machine": {"cpu": "Some CPU", "cpu_capability": "AVX2", "usable_cpus": 2, "torch": "2.13.0"},
              "aggregate": aggregate(runs, arms),
              "settings": {"seeds": [0, 1], "overrides": ["train.max_steps=4"],
                           "arms": [{"name": a, "overrides": [f"method={a}"], "folder": a} for a in arms]}}
    write_outputs(result, tmp_path, arms)
    lines = table(result["aggregate"], arms)
    assert lines[0] == ("| arm | zero-shot shape | text→image R@1 | FID ↓ | trainable params (M) | ms / step |")
    assert lines[2] == "| diffdis | 0.600 ± 0.141 (2) | 0.300 ± 0.141 (2) | 12.00 ± 2.83 (2) | 2.00 ± 0.00 (2) | 15.0 ± 7.1 (2) |"
    assert lines[3] == "| gen_only | 0.300 ± 0.000 (1) | — | 12.00 ± 0.00 (1) | 2.00 ± 0.00 (1) | 10.0 ± 0.0 (1) |"
    md = (tmp_path / "compare.md").read_text()
    assert "\n".join(lines) in md and "gen_only, seed 1: boom" in md and "Commit: `abc`" in md
    assert "Machine: Some CPU (AVX2), 2 CPUs, torch 2.13.0" in md
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert {"command", "commit", "machine", "settings", "runs", "aggregate", "columns", "table_md",
            "failed"} <= set(saved)
    assert saved["aggregate"]["diffdis"]["shape/acc1"]["n"] == 2 and len(saved["runs"]) == 4
    assert [c["metric"] for c in saved["columns"]] == ["shape/acc1", "retrieval/image_retrieval_recall@1", "fid",
                                                       "trainable_parameters", "ms_per_step"]
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_columns_put_the_embedded_tasks_first_and_the_relation_pair_accuracy_beside_its_top1():
    from diffdis.experiments.report import columns

    one = {"mean": 0.5, "std": 0.0, "n": 1}
    stats = {"a": {f"{t}/acc1": one for t in ("relation", "size", "shape", "heldout_colour_shape", "colour", "zzz")}}
    stats["a"]["relation/pair_acc"] = one
    assert [key for _, key, _ in columns(stats)] == [
        "shape/acc1", "colour/acc1", "heldout_colour_shape/acc1", "relation/acc1", "size/acc1", "zzz/acc1",
        "relation/pair_acc"]


# ---------------------------------------------------------------------------- runs: reuse and failures
FAIL = [sys.executable, "-c", "import sys; print('error: ValueError: boom'); sys.exit(3)"]


def finished_run(settings, out, arm, seed, acc):
    """A run folder as a finished run leaves it (model index, summary, metrics, run.json)."""
    folder = lib.run_dir(settings, out, arm, seed)
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "zeroshot_index.json").write_text("{}")
    (folder / "train_summary.json").write_text(json.dumps({"global_step": 4, "ms_per_step": 12.5, "trainable_parameters": 7}))
    (folder / "eval").mkdir()
    (folder / "eval" / "metrics.json").write_text(json.dumps({"metrics": {"shape/acc1": acc}}))
    (folder / "run.json").write_text(json.dumps(lib._identity(settings, arm, seed, folder)))
    return folder


def test_the_commit_and_machine_are_those_the_runs_started_with(tmp_path, monkeypatch):
    arms = [Arm("done")]
    settings = CompareSettings(arms=arms, train_command=FAIL, seeds=[0], overrides=["train.max_steps=4"])
    finished_run(settings, tmp_path, arms[0], 0, 0.75)
    trained, run_all = [], lib.run_all

    def run_all_then_commit(*args, **kwargs):  # the checkout moves on while the runs train
        records = run_all(*args, **kwargs)
        trained.append(True)
        return records

    monkeypatch.setattr(lib, "run_all", run_all_then_commit)
    monkeypatch.setattr(lib, "git_commit", lambda: "b" * 40 if trained else "a" * 40)
    result = lib.run_comparison(settings, tmp_path, command="diffdis-compare", log=lambda line: None)
    assert result["commit"] == "a" * 40 and json.loads((tmp_path / "compare.json").read_text())["commit"] == "a" * 40
    assert result["machine"]["torch"] == torch.__version__
    assert "Machine: " in (tmp_path / "compare.md").read_text()


def test_finished_runs_are_reused_and_a_failure_does_not_stop_the_others(tmp_path):
    arms = [Arm("done"), Arm("broken")]
    settings = CompareSettings(arms=arms, train_command=FAIL, seeds=[0], overrides=["train.max_steps=4"])
    finished_run(settings, tmp_path, arms[0], 0, 0.75)
    lines = []
    runs = lib.run_all(settings, tmp_path, log=lines.append)
    done, broken = runs
    assert done["status"] == "ok" and not done["trained"] and not done["evaluated"]  # FAIL was never run for it
    assert done["metrics"] == {"shape/acc1": 0.75} and done["steps"] == 4 and done["cost"]["ms_per_step"] == 12.5
    assert broken["status"] == "failed" and "exit 3" in broken["error"] and "error: ValueError: boom" in broken["error"]
    assert (tmp_path / "broken" / "seed0" / "train.log").read_text().startswith("error: ValueError: boom")
    assert any("failed" in line for line in lines)


def test_jobs_run_seeds_in_worker_processes_with_a_share_of_the_cores(tmp_path):
    threads = [sys.executable, "-c", "import os, sys; print('error: threads', os.environ['OMP_NUM_THREADS']); sys.exit(3)"]
    arms = [Arm("done"), Arm("broken")]
    settings = CompareSettings(arms=arms, train_command=threads, seeds=[0, 1, 2], overrides=["train.max_steps=4"], jobs=2)
    for seed in (0, 1, 2):
        finished_run(settings, tmp_path, arms[0], seed, 0.5 + seed / 10)
    runs = lib.run_all(settings, tmp_path, log=lambda line: None)
    assert [(r["arm"], r["seed"]) for r in runs] == [(a.name, s) for s in (0, 1, 2) for a in arms]  # seed, then arm order
    assert [r["metrics"]["shape/acc1"] for r in runs if r["arm"] == "done"] == [0.5, 0.6, 0.7]
    share = max(1, (os.cpu_count() or 1) // 2)
    assert all(r["status"] == "failed" and f"error: threads {share}" in r["error"] for r in runs if r["arm"] == "broken")


FAKE_TRAINER = """
import json, pathlib, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
folder = pathlib.Path(args["train.output_dir"])
spans = folder.parents[1] / "spans.txt"
began = time.time()
time.sleep(0.5)
source = args.get("source")
if source and not (pathlib.Path(source) / "zeroshot_index.json").is_file():
    print("error: started before the run it reads had ended"); sys.exit(3)
(folder / "model").mkdir(parents=True)
(folder / "model" / "zeroshot_index.json").write_text("{}")
(folder / "train_summary.json").write_text(json.dumps({"global_step": 4, "ms_per_step": 1.0}))
(folder / "eval").mkdir()
(folder / "eval" / "metrics.json").write_text(json.dumps({"metrics": {"shape/acc1": 1.0}}))
with spans.open("a") as fh:
    fh.write(f"{began} {time.time()}\\n")
"""


def test_jobs_keep_every_worker_busy_and_start_a_reading_arm_after_its_source(tmp_path):
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    arms = [Arm("a"), Arm("b", ("source={run:a}",))]
    settings = CompareSettings(arms=arms, train_command=[sys.executable, str(trainer)], seeds=[0, 1, 2], jobs=2)
    lines = []
    runs = lib.run_all(settings, tmp_path / "out", log=lines.append)
    assert [(r["arm"], r["seed"], r["status"]) for r in runs] == [(a.name, s, "ok") for s in (0, 1, 2) for a in arms], runs
    spans = [tuple(map(float, line.split())) for line in (tmp_path / "out" / "spans.txt").read_text().splitlines()]
    assert len(spans) == 6
    most = max(sum(b <= t < e for b, e in spans) for t, _ in spans)
    assert most == 2  # two at once, never more
    started = [line.split("] ")[1].split(" ->")[0] for line in lines if " -> " in line]
    # the source arm's runs first: the third worker slot goes to seed 2's "a", not to seed 0's "b" (which would
    # leave seed 2's "b" waiting alone at the end)
    assert started[:3] == ["a, seed 0", "a, seed 1", "a, seed 2"], started
    assert sorted(started[3:]) == ["b, seed 0", "b, seed 1", "b, seed 2"]
    assert lines[0] == f"6 runs, 2 at a time, {max(1, (os.cpu_count() or 1) // 2)} thread(s) each"


def test_a_prior_run_is_trained_but_not_evaluated(tmp_path):
    arm = Arm("prior", ("method=prior",))
    settings = CompareSettings(arms=[arm], train_command=FAIL, seeds=[0], overrides=["train.max_steps=4"])
    folder = lib.run_dir(settings, tmp_path, arm, 0)
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "prior_index.json").write_text("{}")
    (folder / "train_summary.json").write_text(json.dumps({"global_step": 4, "ms_per_step": 3.0}))
    (folder / "run.json").write_text(json.dumps(lib._identity(settings, arm, 0, folder)))
    (run,) = lib.run_all(settings, tmp_path, log=lambda line: None)
    assert run["status"] == "ok" and run["metrics"] == {} and run["cost"]["ms_per_step"] == 3.0 and not run["trained"]


def test_run_folder_of_other_settings_is_refused(tmp_path):
    arm = Arm("a", ("method=diffdis",))
    settings = CompareSettings(arms=[arm], train_command=FAIL, seeds=[0], overrides=["train.max_steps=4"])
    finished_run(settings, tmp_path, arm, 0, 0.5)
    lib.check_reusable(settings, tmp_path)
    other = CompareSettings(arms=[arm], train_command=FAIL, seeds=[0], overrides=["train.max_steps=5"])
    with pytest.raises(CompareError, match="trained with other arguments"):
        lib.check_reusable(other, tmp_path)


# ---------------------------------------------------------------------------- train_summary.json cost keys
def test_resource_summary():
    from diffdis.train.trainer import resource_summary

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 16 + 10 parameters
    module[1].requires_grad_(False)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)
    run = SimpleNamespace(accelerator=accelerator, loop_seconds=2.0, loop_steps=4, pause_seconds=0.5, reached_step=None)
    cost = resource_summary(run, module)
    assert cost["train_seconds"] == 1.5 and cost["stopped_at_target_step"] is None
    assert cost["trainable_parameters"] == 16 and cost["total_parameters"] == 26
    assert cost["ms_per_step"] == 500.0 and cost["train_loop_steps"] == 4
    assert cost["peak_rss_mb"] > 10 and cost["peak_cuda_memory_mb"] is None and cost["device"] == "cpu"
    assert resource_summary(SimpleNamespace(accelerator=accelerator, loop_seconds=0.0, loop_steps=0, pause_seconds=0.0,
                                            reached_step=None), module)["ms_per_step"] is None


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_two_arms_two_seeds_end_to_end(tmp_path, tiny_overrides):
    out = tmp_path / "cmp"
    overrides = [o for o in tiny_overrides if not o.startswith("train.report_to")] + ["train.max_steps=2", "train.report_to=none"]
    argv = ["--out", str(out), "--arm", "diffdis", "--arm", "lam0:method=diffdis,loss.lambda_ita=0", "--seeds", "0", "1",
            "--eval-args", SMALL_EVAL + " --skip fid", *overrides]
    assert cli.main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = {line.split(" | ")[0][2:]: line for line in result["table_md"][2:]}
    assert set(rows) == {"diffdis", "lam0"}
    for line in rows.values():  # every cell over both seeds, or "—" where the arm's model is not scored on it
        cells = line.strip("| ").split(" | ")[1:]
        assert len(cells) == len(result["columns"]) and all(c.endswith("(2)") or c == "—" for c in cells), line
    assert "—" not in rows["diffdis"] and rows["lam0"].count("—") == 4  # λ=0 trains no text stream: no retrieval
    assert result["aggregate"]["lam0"]["shape/acc1"]["n"] == 2 and result["failed"] == 0
    assert "fid" not in result["aggregate"]["diffdis"] and "adherence/both" in result["aggregate"]["diffdis"]
    for run in result["runs"]:
        assert run["status"] == "ok" and run["steps"] == 2 and run["trained"]
        assert run["cost"]["ms_per_step"] > 0 and run["cost"]["trainable_parameters"] > 0 and run["cost"]["peak_rss_mb"] > 0
    seeds = {(r["arm"], r["seed"]) for r in result["runs"]}
    assert seeds == {("diffdis", 0), ("diffdis", 1), ("lam0", 0), ("lam0", 1)}
    a, b = (json.loads((out / "diffdis" / f"seed{s}" / "train_summary.json").read_text()) for s in (0, 1))
    assert a["replica_param_checksums"] != b["replica_param_checksums"]  # the seeds really differ
    assert "| diffdis |" in (out / "compare.md").read_text() and (out / "compare.png").is_file()
    assert cli.main(argv) == 0  # repeated: every run reused, nothing trained or evaluated again
    again = json.loads((out / "compare.json").read_text())
    assert not any(r["trained"] or r["evaluated"] for r in again["runs"])
    assert again["aggregate"] == result["aggregate"]


@pytest.mark.slow
def test_a_chain_of_arms_clip_prior_rleg(tmp_path, tiny_overrides):
    """rleg with a diffusion prior trained on the clip arm's model, in one comparison: each arm reads the run of the
    same seed of an earlier one; the prior's row has costs and no metric."""
    out = tmp_path / "chain"
    overrides = [o for o in tiny_overrides if not o.startswith("train.report_to")] + ["train.max_steps=2", "train.report_to=none"]
    argv = ["--out", str(out), "--arm", "clip", "--arm", "prior:method=prior,model.prior.clip={run:clip}",
            "--arm", "rleg:method=rleg,model.rleg.prior={run:prior}", "--seeds", "0",
            "--eval-args", SMALL_EVAL + " --skip fid adherence", *overrides]
    assert cli.main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["failed"] == 0 and result["aggregate"]["rleg"]["shape/acc1"]["n"] == 1
    assert "shape/acc1" not in result["aggregate"]["prior"] and result["aggregate"]["prior"]["ms_per_step"]["n"] == 1
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(out / "rleg" / "seed0" / "config.yaml")
    assert cfg.model.rleg.prior == str(out / "prior" / "seed0" / "model")
