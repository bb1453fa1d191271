"""Bad input on the command line, table-driven: every command (train, distill with every
method, sample, bench, schedule, samplers, export, demo) refuses each of these invocations
with exit code 2 and exactly one line on stderr (no traceback), before anything is written:
the files under the test's folders are the same after the call as before it.

Values are checked by the options tables (fewstep.train.options: the loop's, the teacher's
TRAIN_OPTIONS, COMMON_OPTIONS and each method's OPTIONS with its check_options), in config
files too; output paths by fewstep.train.runfolder.check_output; counts whose arrays exceed
this machine's memory by fewstep.train.options.check_memory (the numbers below exceed any).
"""
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from fewstep.cli import main

NET = {"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16}
HUGE = "10000000000000"  # 1e13 samples: terabytes for any data
RO = "/proc/fewstep-bad-cli/out"  # not writable, even for root (Linux)

# config files of the table, by name (@CFG:name); a string is written as it is
CONFIGS = {
    "steps_abc": {"steps": "abc"}, "lr_fast": {"lr": "fast"}, "steps_null": {"steps": None},
    "wd_heavy": {"weight_decay": "heavy"}, "unet_dropout_x": {"net": {"kind": "unet", "in_channels": 1, "dropout": "x"}},
    "mlp_hidden_neg": {"net": {**NET, "hidden": -3}}, "net_text": {"net": "mlp"}, "net_kind": {"net": {"kind": "rnn"}},
    "process_5": {"process": 5}, "conditional_yes": {"conditional": "yes"}, "family_xx": {"family": "xx"},
    "sigma_data_neg": {"sigma_data": -1}, "sigma_data_0": {"sigma_data": 0}, "label_dropout_2": {"label_dropout": 2},
    "eval_samples_0": {"eval_samples": 0}, "eval_nfe_0": {"eval_nfe": 0}, "eval_samples_huge": {"eval_samples": 10**13},
    "n_data_0": {"n_data": 0}, "unknown_key": {"stepz": 5}, "a_list": [1, 2], "not_json": "{steps: 5",
    "seed_big": {"seed": 2**70}, "batch_true": {"batch_size": True}, "ema_1": {"ema_decay": 1.0},
    "pairs_many": {"pairs": "many"}, "mlp_dropout_x": {"net": {**NET, "dropout": "x"}},
    "start_steps_text": {"start_steps": "64"}, "mu_text": {"mu": "high"}, "w_min_null_text": {"w_min": "low"},
    "rounds_half": {"rounds": 1.5}, "eval_emd_text": {"eval_emd": "yes"}, "net_list": {"net": [1, 2]},
}

T = ["train", "--data", "moons", "--out", "@W/r", "--quiet", "--steps", "2"]
K = ["distill", "knowledge", "--teacher", "gmm:@G", "--out", "@W/r", "--quiet", "--steps", "2"]
P = ["distill", "progressive", "--teacher", "gmm:@G", "--out", "@W/r", "--quiet", "--steps", "2"]
CM = ["distill", "consistency", "--teacher", "gmm:@G", "--out", "@W/r", "--quiet", "--steps", "2"]
R = ["distill", "reflow", "--teacher", "gmm:@G", "--out", "@W/r", "--quiet", "--steps", "2"]
PC = ["distill", "pointcloud", "--out", "@W/r", "--quiet", "--steps", "2"]
GD = ["distill", "guided", "--teacher", "gmm:@GC", "--out", "@W/r", "--quiet", "--steps", "2"]
SA = ["sample", "gmm:@G", "--nfe", "4", "--n", "10", "--out", "@W/x.npz"]
B = ["bench", "--teacher", "gmm:@G", "--out", "@W/b", "--quiet", "--samplers", "euler", "--nfe", "1", "--n", "20",
     "--nll", "0", "--no-reference"]
SC = ["schedule", "--teacher", "gmm:@G", "--sampler", "euler", "--nfe", "4", "--n", "8", "--candidates", "8",
      "--iters", "1", "--out", "@W/s.json", "--quiet"]
E = ["export", "@S", "@W/e"]
D = ["demo", "--out", "@W/d", "--quiet", "--steps", "2", "--students", "none"]


def _net(**kw) -> str:
    return json.dumps({**NET, **kw})


# (kind, argv, a piece of the one error line)
CASES = [
    # --------------------------------------------------------------- train: loop options
    ("train", T + ["--steps", "0"], "--steps"), ("train", T + ["--steps", "-3"], "--steps"),
    ("train", T + ["--steps", "2.5"], "--steps"), ("train", T + ["--steps", "abc"], "--steps"),
    ("train", T + ["--steps", "nan"], "--steps"),
    ("train", T + ["--label-dropout", "0.3"], "unconditional"), ("train", T + ["--conditional", "--label-dropout", "1"], "--label-dropout"),
    ("train", T + ["--batch-size", "0"], "--batch-size"), ("train", T + ["--batch-size", "1.5"], "--batch-size"),
    ("train", T + ["--batch-size", HUGE], "memory"),
    ("train", T + ["--lr", "0"], "--lr"), ("train", T + ["--lr", "-1"], "--lr"), ("train", T + ["--lr", "nan"], "--lr"),
    ("train", T + ["--lr", "inf"], "--lr"), ("train", T + ["--lr", "fast"], "--lr"),
    ("train", T + ["--warmup", "-1"], "--warmup"), ("train", T + ["--warmup", "1.5"], "--warmup"),
    ("train", T + ["--weight-decay", "-0.1"], "--weight-decay"), ("train", T + ["--weight-decay", "nan"], "--weight-decay"),
    ("train", T + ["--grad-clip", "-1"], "--grad-clip"), ("train", T + ["--grad-clip", "inf"], "--grad-clip"),
    ("train", T + ["--ema-decay", "2"], "--ema-decay"), ("train", T + ["--ema-decay", "1"], "--ema-decay"),
    ("train", T + ["--ema-decay", "-0.1"], "--ema-decay"),
    ("train", T + ["--seed", "-1"], "--seed"), ("train", T + ["--seed", "99999999999999999999999"], "--seed"),
    ("train", T + ["--seed", "1.5"], "--seed"), ("train", T + ["--seed", "4294967296"], "--seed"),
    ("train", T + ["--device", "bogus"], "--device"), ("train", T + ["--device", "cuda:99"], "cuda:99"),
    ("train", T + ["--device", "gpu"], "--device"), ("train", T + ["--mixed-precision", "bogus"], "--mixed-precision"),
    ("train", T + ["--checkpoint-every", "0"], "--checkpoint-every"),
    ("train", T + ["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    ("train", T + ["--keep-checkpoints", "0"], "--keep-checkpoints"), ("train", T + ["--log-every", "0"], "--log-every"),
    # ----------------------------------------------------------- train: the teacher's own
    ("train", T + ["--n-data", "0"], "--n-data"), ("train", T + ["--n-data", "-5"], "--n-data"),
    ("train", ["train", "--data", "moonz", "--out", "@W/r"], "moons"),
    ("train", T + ["--process", "vq"], "unknown process 'vq'"),
    ("train", T + ["--prediction", "epsilon"], "unknown prediction 'epsilon'"),
    ("train", T + ["--weighting", "bogus"], "weighting"),
    ("train", ["train", "--data", "swiss_roll", "--conditional", "--out", "@W/r", "--steps", "2"], "no labels"),
    ("train", T + ["--family", "bogus"], "--family"),
    ("train", T + ["--family", "arm", "--process", "vp"], "diffusion teacher"),
    ("train", T + ["--family", "ebm", "--ebm-steps", "abc"], "--ebm-steps"),
    ("train", T + ["--family", "ncsn", "--ncsn-levels", "0"], "levels"),
    ("train", ["train", "--data", "@W/missing.npz", "--out", "@W/r"], "missing.npz"),
    # -------------------------------------------------------- train: config file values
    ("train", T[:-2] + ["--config", "@CFG:steps_abc"], '"steps"'),
    ("train", T[:-2] + ["--config", "@CFG:steps_null"], '"steps"'), ("train", T + ["--config", "@CFG:lr_fast"], '"lr"'),
    ("train", T + ["--config", "@CFG:wd_heavy"], '"weight_decay"'),
    ("train", ["train", "--data", "digits", "--out", "@W/r", "--config", "@CFG:unet_dropout_x"], '"dropout"'),
    ("train", T + ["--config", "@CFG:mlp_hidden_neg"], '"hidden"'), ("train", T + ["--config", "@CFG:net_text"], '"net"'),
    ("train", T + ["--config", "@CFG:net_kind"], "rnn"), ("train", T + ["--config", "@CFG:net_list"], '"net"'),
    ("train", T + ["--config", "@CFG:process_5"], '"process"'),
    ("train", T + ["--config", "@CFG:conditional_yes"], '"conditional"'),
    ("train", T + ["--config", "@CFG:family_xx"], '"family"'),
    ("train", T + ["--config", "@CFG:sigma_data_neg"], '"sigma_data"'),
    ("train", T + ["--config", "@CFG:sigma_data_0"], '"sigma_data"'),
    ("train", T + ["--config", "@CFG:label_dropout_2"], '"label_dropout"'),
    ("train", T + ["--config", "@CFG:eval_samples_0"], '"eval_samples"'),
    ("train", T + ["--config", "@CFG:eval_nfe_0"], '"eval_nfe"'),
    ("train", T + ["--config", "@CFG:eval_samples_huge"], "memory"),
    ("train", T + ["--config", "@CFG:n_data_0"], '"n_data"'), ("train", T + ["--config", "@CFG:unknown_key"], "stepz"),
    ("train", T + ["--config", "@CFG:a_list"], "JSON object"), ("train", T + ["--config", "@CFG:not_json"], "not valid JSON"),
    ("train", T + ["--config", "@CFG:seed_big"], '"seed"'), ("train", T + ["--config", "@CFG:batch_true"], '"batch_size"'),
    ("train", T + ["--config", "@CFG:ema_1"], '"ema_decay"'), ("train", T + ["--config", "@W/nope.json"], "not found"),
    # ------------------------------------------------------------------- train: --out
    ("train", ["train", "--data", "moons", "--out", "@G"], "is a file"),
    ("train", ["train", "--data", "moons", "--out", "@G/r"], "is a file"),
    ("train", ["train", "--data", "moons", "--out", RO], "not writable"),
    ("train", ["train", "--data", "moons", "--out", "@S"], "'knowledge' distillation run"),
    ("train", ["train", "--data", "moons", "--out", "@T"], "exists and is not empty"),
    ("train", ["train", "--data", "moons", "--out", "@FX/cfg"], "exists and is not empty"),
    ("train", ["train", "--resume", "--out", "@W/nothing"], "not a fewstep run folder"),
    ("train", ["train", "--data", "moons"], "--out"), ("train", T + ["--bogus"], "--bogus"),
    # ------------------------------------------------------------ distill knowledge
    ("knowledge", K + ["--pairs", "64.5"], "--pairs"), ("knowledge", K + ["--pairs", "0"], "--pairs"),
    ("knowledge", K + ["--pairs", HUGE], "memory"), ("knowledge", K + ["--pair-batch", "0"], "--pair-batch"),
    ("knowledge", K + ["--pair-batch", HUGE, "--pairs", "100"], "memory"),
    ("knowledge", K + ["--pair-nfe", "0"], "--pair-nfe"), ("knowledge", K + ["--pair-sampler", "eulr"], "eulr"),
    ("knowledge", K + ["--pair-grid", "kraras"], "kraras"), ("knowledge", K + ["--init", "bogus"], "--init"),
    ("knowledge", K + ["--latent-dim", "0"], "--latent-dim"), ("knowledge", K + ["--latent-dim", "1.5"], "--latent-dim"),
    ("knowledge", K + ["--distance", "l1"], "--distance"), ("knowledge", K + ["--distance", "chamfer"], "point sets"),
    ("knowledge", K + ["--lr", "nan"], "--lr"), ("knowledge", K + ["--lr", "inf"], "--lr"),
    ("knowledge", K + ["--ema-decay", "2"], "--ema-decay"), ("knowledge", K + ["--guidance", "nan"], "--guidance"),
    ("knowledge", K + ["--guidance", "2"], "unconditional"), ("knowledge", K + ["--guidance", "-1"], "--guidance"),
    ("knowledge", K + ["--label-dropout", "0.1"], "unconditional"),
    ("knowledge", K + ["--label-dropout", "1.5"], "--label-dropout"),
    ("knowledge", K + ["--batch-size", HUGE], "memory"), ("knowledge", K + ["--seed", "-1"], "--seed"),
    ("knowledge", K + ["--steps", "0"], "--steps"),
    ("knowledge", ["distill", "knowledge", "--teacher", "@S", "--out", "@W/r"], "student"),
    ("knowledge", ["distill", "knowledge", "--teacher", "@W/missing", "--out", "@W/r"], "missing"),
    ("knowledge", ["distill", "knowledge", "--teacher", "gmm:@W/none.npz", "--out", "@W/r"], "none.npz"),
    ("knowledge", ["distill", "knowledge", "--out", "@W/r"], "--teacher"),
    ("knowledge", K + ["--net", "{bad"], "--net"), ("knowledge", K + ["--net", _net(depth="deep")], '"depth"'),
    ("knowledge", K + ["--net", '{"kind": "transformer"}'], "transformer"),
    ("knowledge", K + ["--net", _net(use_cond="yes")], '"use_cond"'),
    ("knowledge", K + ["--config", "@CFG:pairs_many"], '"pairs"'),
    ("knowledge", K + ["--config", "@CFG:mlp_dropout_x"], "dropout"),
    ("knowledge", K[:-2] + ["--config", "@CFG:steps_null"], '"steps"'),
    ("knowledge", ["distill", "knowledge", "--teacher", "gmm:@G", "--out", "@T"], "teacher run"),
    ("knowledge", ["distill", "knowledge", "--teacher", "gmm:@G", "--out", "@S"], "exists and is not empty"),
    ("knowledge", ["distill", "knowledge", "--teacher", "gmm:@G", "--out", RO], "not writable"),
    ("knowledge", ["distill", "knowledge", "--teacher", "gmm:@G", "--out", "@G"], "is a file"),
    ("knowledge", K + ["--pairs", "many"], "--pairs"),
    # ---------------------------------------------------------- distill progressive
    ("progressive", P + ["--start-steps", "6"], "power of two"), ("progressive", P + ["--start-steps", "0"], "power of two"),
    ("progressive", P + ["--end-steps", "3"], "power of two"),
    ("progressive", P + ["--start-steps", "4", "--end-steps", "8"], "below --start-steps"),
    ("progressive", P + ["--prediction", "eps"], "--prediction"),
    ("progressive", P + ["--level-groups", "0"], "--level-groups"),
    ("progressive", P + ["--weighting", "bogus"], "bogus"), ("progressive", P + ["--process", "bogus"], "bogus"),
    ("progressive", ["distill", "progressive", "--teacher", "@C", "--out", "@W/r"], "clouds"),
    ("progressive", ["distill", "progressive", "--teacher", "@S", "--out", "@W/r"], "student"),
    ("progressive", P + ["--guidance", "2"], "unconditional"), ("progressive", P + ["--lr", "-1"], "--lr"),
    ("progressive", P + ["--config", "@CFG:start_steps_text"], '"start_steps"'),
    # ---------------------------------------------------------- distill consistency
    ("consistency", CM + ["--rho", "0"], "--rho"), ("consistency", CM + ["--rho", "-1"], "--rho"),
    ("consistency", CM + ["--schedule", "ct", "--s0", "200", "--s1", "100"], "--s0 200 must be below --s1 100"),
    ("consistency", CM + ["--schedule", "ict", "--s0", "2000"], "--s0"),
    ("consistency", CM + ["--s0", "5"], "--s0"), ("consistency", CM + ["--s1", "5"], "--s1"),
    ("consistency", CM + ["--huber-c", "-1"], "--huber-c"), ("consistency", CM + ["--huber-c", "0"], "--huber-c"),
    ("consistency", CM + ["--p-std", "-1"], "--p-std"), ("consistency", CM + ["--p-std", "0"], "--p-std"),
    ("consistency", CM + ["--p-mean", "nan"], "--p-mean"),
    ("consistency", CM + ["--level-groups", "0"], "--level-groups"), ("consistency", CM + ["--n", "1"], "--n"),
    ("consistency", CM + ["--mu", "1"], "--mu"), ("consistency", CM + ["--mu", "-0.5"], "--mu"),
    ("consistency", CM + ["--mode", "bogus"], "--mode"), ("consistency", CM + ["--schedule", "bogus"], "--schedule"),
    ("consistency", CM + ["--loss", "l1"], "--loss"), ("consistency", CM + ["--weighting", "bogus"], "--weighting"),
    ("consistency", CM + ["--levels", "bogus"], "--levels"), ("consistency", CM + ["--sigma-min", "0"], "--sigma-min"),
    ("consistency", CM + ["--sigma-min", "5", "--sigma-max", "1"], "--sigma-min"),
    ("consistency", CM + ["--sigma-max", "-1"], "--sigma-max"), ("consistency", CM + ["--init", "bogus"], "--init"),
    ("consistency", CM + ["--solver", "ddpm"], "--solver"), ("consistency", CM + ["--solver", "eulr"], "eulr"),
    ("consistency", CM + ["--tune-levels", "-1"], "--tune-levels"),
    ("consistency", CM + ["--sample-levels", "[1]"], "--sample-levels"),
    ("consistency", CM + ["--sample-levels", "{bad"], "--sample-levels"),
    ("consistency", CM + ["--sample-levels", '{"2": [100]}'], "--sample-levels"),
    ("consistency", CM + ["--sample-levels", '{"2": ["x"]}'], "--sample-levels"),
    ("consistency", ["distill", "consistency", "--teacher", "@C", "--out", "@W/r"], "clouds"),
    ("consistency", ["distill", "consistency", "--mode", "training", "--out", "@W/r"], "--data"),
    ("consistency", CM + ["--config", "@CFG:mu_text"], '"mu"'),
    # ---------------------------------------------------------------- distill reflow
    ("reflow", R + ["--rounds", "0"], "--rounds"), ("reflow", R + ["--round-steps", "5,5,5"], "--round-steps"),
    ("reflow", R + ["--round-steps", "a,b"], "--round-steps"), ("reflow", R + ["--distill-steps", "-1"], "--distill-steps"),
    ("reflow", R + ["--eval-samples", "1"], "--eval-samples"), ("reflow", R + ["--couplings", "ot"], "--couplings"),
    ("reflow", ["distill", "reflow", "--data", "gmm:@G", "--couplings", "teacher", "--out", "@W/r"], "needs --teacher"),
    ("reflow", R + ["--init", "teacher"], "--init"), ("reflow", R + ["--pairs", "0"], "--pairs"),
    ("reflow", R + ["--pair-batch", "0"], "--pair-batch"), ("reflow", R + ["--reflow-nfe", "0"], "--reflow-nfe"),
    ("reflow", R + ["--reflow-sampler", "nope"], "nope"), ("reflow", R + ["--n-data", "0"], "--n-data"),
    ("reflow", R + ["--distance", "l1"], "--distance"),
    ("reflow", ["distill", "reflow", "--data", "swiss_roll", "--batch-size", HUGE, "--out", "@W/r"], "memory"),
    ("reflow", ["distill", "reflow", "--out", "@W/r", "--quiet"], "--data"),
    ("reflow", ["distill", "reflow", "--teacher", "@S", "--out", "@W/r"], "student"),
    ("reflow", R + ["--config", "@CFG:rounds_half"], '"rounds"'),
    # ------------------------------------------------------------ distill pointcloud
    ("pointcloud", PC + ["--eval-emd", "maybe"], "--eval-emd"), ("pointcloud", PC + ["--renders", "0"], "--renders"),
    ("pointcloud", PC + ["--teacher", "gmm:@G"], "point-cloud flow teacher"),
    ("pointcloud", PC + ["--eval-clouds", "1"], "--eval-clouds"),
    ("pointcloud", PC + ["--distance", "hausdorff"], "hausdorff"), ("pointcloud", PC + ["--data", "moons"], "not point clouds"),
    ("pointcloud", PC + ["--n-data", "0"], "--n-data"), ("pointcloud", PC + ["--teacher-steps", "0"], "--teacher-steps"),
    ("pointcloud", PC + ["--pair-sampler", "nope"], "nope"), ("pointcloud", PC + ["--eval-sampler", "nope"], "nope"),
    ("pointcloud", PC + ["--config", "@CFG:eval_emd_text"], '"eval_emd"'),
    # ---------------------------------------------------------------- distill guided
    ("guided", GD + ["--w-min", "3", "--w-max", "2"], "above --w-max"), ("guided", GD + ["--w-min", "-1"], "--w-min"),
    ("guided", GD + ["--w-min", "nan"], "--w-min"), ("guided", GD + ["--w-max", "inf"], "--w-max"),
    ("guided", GD + ["--w-default", "9"], "outside"), ("guided", GD + ["--start-steps", "6"], "power of two"),
    ("guided", GD + ["--start-steps", "4", "--end-steps", "4"], "below --start-steps"),
    ("guided", GD + ["--stage1-steps", "0"], "--stage1-steps"), ("guided", GD + ["--guidance", "3"], "when sampling"),
    ("guided", GD + ["--prediction", "eps"], "--prediction"), ("guided", GD + ["--level-groups", "0"], "--level-groups"),
    ("guided", ["distill", "guided", "--teacher", "gmm:@G", "--out", "@W/r"], "unconditional"),
    ("guided", ["distill", "guided", "--teacher", "@C", "--out", "@W/r"], "clouds"),
    ("guided", GD + ["--config", "@CFG:w_min_null_text"], '"w_min"'),
    ("distill", ["distill"], "give a method"), ("distill", ["distill", "bogus"], "bogus"),
    # ------------------------------------------------------------------------- sample
    ("sample", SA + ["--nfe", "0"], "--nfe"), ("sample", SA + ["--nfe", "abc"], "--nfe"),
    ("sample", SA + ["--nfe", "2.5"], "--nfe"), ("sample", SA + ["--n", "0"], "--n"), ("sample", SA + ["--n", "-1"], "--n"),
    ("sample", SA + ["--n", HUGE], "memory"), ("sample", SA + ["--guidance", "nan"], "--guidance"),
    ("sample", SA + ["--guidance", "-1"], "--guidance"), ("sample", SA + ["--guidance", "2"], "unconditional"),
    ("sample", SA + ["--label", "7"], "--label"), ("sample", SA + ["--label", "abc"], "--label"),
    ("sample", SA + ["--seed", "-1"], "--seed"), ("sample", SA + ["--seed", "99999999999999999999999"], "--seed"),
    ("sample", SA + ["--device", "bogus"], "--device"), ("sample", SA + ["--device", "cuda:99"], "cuda:99"),
    ("sample", SA + ["--sampler", "eulr"], "eulr"), ("sample", SA + ["--grid", "kraras"], "kraras"),
    ("sample", SA + ["--grid", "@W/g.json"], "g.json"),
    ("sample", ["sample", "gmm:@G", "--nfe", "4", "--out", "@W/x.txt"], ".npz"),
    ("sample", ["sample", "gmm:@G", "--nfe", "4", "--out", "@FX/dir.npz"], "is a folder"),
    ("sample", ["sample", "gmm:@G", "--nfe", "4", "--out", RO + "/x.npz"], "not writable"),
    ("sample", ["sample", "gmm:@G", "--nfe", "4", "--out", "@G/x.npz"], "is a file"),
    ("sample", ["sample", "@W/norun", "--nfe", "4", "--out", "@W/x.npz"], "norun"),
    ("sample", ["sample", "gmm:@W/nogmm.npz", "--nfe", "4", "--out", "@W/x.npz"], "nogmm.npz"),
    ("sample", ["sample", "gmm:@GC", "--nfe", "4", "--n", "10", "--label", "99", "--out", "@W/x.npz"], "--label"),
    ("sample", ["sample", "gmm:@GC", "--nfe", "4", "--n", "10", "--guidance", "inf", "--out", "@W/x.npz"], "--guidance"),
    ("sample", ["sample", "gmm:@G", "--out", "@W/x.npz"], "--nfe"),
    # -------------------------------------------------------------------------- bench
    ("bench", B + ["--n", "5"], "--n"), ("bench", B + ["--n", "abc"], "--n"), ("bench", B + ["--n", HUGE], "memory"),
    ("bench", B + ["--nll", "-1"], "--nll"), ("bench", B + ["--nfe", "0,2"], "--nfe"), ("bench", B + ["--nfe", "a"], "--nfe"),
    ("bench", B + ["--samplers", "eulr"], "eulr"), ("bench", B + ["--students", "@W/none"], "not found"),
    ("bench", ["bench", "--teacher", "@W/missing", "--out", "@W/b"], "missing"),
    ("bench", B + ["--guidance", "nan"], "--guidance"), ("bench", B + ["--guidance", "2"], "unconditional"),
    ("bench", B + ["--label", "0"], "--label"), ("bench", B + ["--seed", "-1"], "--seed"),
    ("bench", B + ["--device", "bogus"], "--device"),
    ("bench", ["bench", "--teacher", "gmm:@G", "--out", "@G"], "is a file"),
    ("bench", ["bench", "--teacher", "gmm:@G", "--out", "@T"], "teacher run"),
    ("bench", ["bench", "--teacher", "gmm:@G", "--out", RO], "not writable"),
    # ----------------------------------------------------------------------- schedule
    ("schedule", SC + ["--candidates", "1000000000"], "memory"), ("schedule", SC + ["--candidates", "1"], "--candidates"),
    ("schedule", SC + ["--iters", "0"], "--iters"), ("schedule", SC + ["--n", "1"], "--n"),
    ("schedule", SC + ["--n", HUGE], "memory"), ("schedule", SC + ["--nfe", "0"], "--nfe"),
    ("schedule", SC + ["--nfe", "abc"], "--nfe"), ("schedule", SC + ["--sampler", "rk45"], "rk45"),
    ("schedule", SC + ["--sampler", "eulr"], "eulr"), ("schedule", SC + ["--method", "nope"], "--method"),
    ("schedule", SC + ["--cost", "nope"], "--cost"), ("schedule", SC + ["--seed", "-1"], "--seed"),
    ("schedule", SC + ["--device", "bogus"], "--device"),
    ("schedule", SC + ["--seconds", "-5"], "--seconds"), ("schedule", SC + ["--sigma-max", "nan"], "--sigma-max"),
    ("schedule", SC + ["--sigma-max", "0.001"], "--sigma-max"),
    ("schedule", SC[:-3] + ["--out", "@W/s.txt"], ".json"), ("schedule", SC[:-3] + ["--out", RO + "/s.json"], "not writable"),
    ("schedule", SC[:-3] + ["--out", "@FX/dir.json"], "is a folder"),
    ("schedule", ["schedule", "--teacher", "@W/missing", "--sampler", "euler", "--nfe", "4", "--out", "@W/s.json"],
     "missing"),
    # ------------------------------------------------------------ samplers, export, demo
    ("samplers", ["samplers", "--bogus"], "--bogus"), ("samplers", ["samplers", "extra"], "extra"),
    ("export", E + ["--nfe", "0"], "--nfe"), ("export", E + ["--nfe", "abc"], "--nfe"),
    ("export", ["export", "@S", "@G"], "is a file"), ("export", ["export", "@S", RO], "not writable"),
    ("export", ["export", "@W/nothing", "@W/e"], ""), ("export", ["export", "@T", "@W/e"], ""),
    ("export", E + ["--format", "onnx"], "--format"),
    ("demo", D + ["--data", "shapes16"], "2-D toy"), ("demo", D + ["--data", "digits"], "2-D toy"),
    ("demo", D + ["--data", "moonz"], "2-D toy"), ("demo", D + ["--data", "gmm:@G"], "2-D toy"),
    ("demo", D + ["--steps", "0"], "--steps"), ("demo", D + ["--steps", "abc"], "--steps"),
    ("demo", D + ["--seed", "-1"], "--seed"), ("demo", D + ["--device", "bogus"], "--device"),
    ("demo", ["demo", "--out", "@G"], "is a file"), ("demo", ["demo", "--out", RO], "not writable"),
    ("demo", ["demo", "--out", "@W/d", "--students", "knowledge,magic"], "magic"),
    ("demo", ["demo", "--out", "@T"], "not a demo"),
]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Tiny inputs for the table: exact mixtures (plain, class-conditional), a teacher run, a
    knowledge student, a point-cloud flow teacher, the config files, two folders named like files."""
    from _exact import save_gmm_cond

    from fewstep.data.gmm import GaussianMixture
    from fewstep.methods import distill
    from fewstep.train.teacher import train_teacher

    root = tmp_path_factory.mktemp("bad_cli")
    GaussianMixture.ring(4).save(root / "g.npz")
    save_gmm_cond(root / "gc.npz")
    train_teacher({"data": "moons", "steps": 20, "batch_size": 32, "device": "cpu", "eval_samples": 50,
                   "eval_nfe": 2, "net": NET}, str(root / "teacher"), progress=False)
    distill("knowledge", {"teacher": f"gmm:{root / 'g.npz'}", "pairs": 32, "pair_batch": 32, "pair_nfe": 2,
                          "steps": 2, "batch_size": 8, "device": "cpu", "net": NET}, str(root / "student"),
            progress=False)
    train_teacher({"data": "pointclouds:points=16", "n_data": 8, "steps": 2, "batch_size": 4, "process": "flow",
                   "prediction": "flow", "eval_samples": 2, "eval_nfe": 2, "device": "cpu"}, str(root / "cloud"),
                  progress=False)
    (root / "cfg").mkdir()
    for name, obj in CONFIGS.items():
        (root / "cfg" / f"{name}.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    (root / "dir.npz").mkdir()
    (root / "dir.json").mkdir()
    return root


def _argv(args, fx: Path, work: Path) -> list:
    subs = {"@GC": fx / "gc.npz", "@G": fx / "g.npz", "@T": fx / "teacher", "@S": fx / "student",
            "@C": fx / "cloud", "@FX": fx, "@W": work}
    out = []
    for a in args:
        if a.startswith("@CFG:"):
            a = str(fx / "cfg" / f"{a[5:]}.json")
        for k, v in subs.items():
            a = a.replace(k, str(v))
        out.append(a)
    return out


def _tree(*roots: Path) -> dict:
    """Every file (size, mtime) and folder under ``roots``."""
    state = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            for d in dirs:
                state[os.path.join(dirpath, d)] = "dir"
            for f in files:
                st = os.stat(os.path.join(dirpath, f))
                state[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return state


def test_the_table_is_large_and_distinct():
    argvs = [tuple(args) for _, args, _ in CASES]
    assert len(set(argvs)) == len(argvs), [a for a, n in Counter(argvs).items() if n > 1]
    assert len(CASES) >= 150
    kinds = Counter(kind for kind, _, _ in CASES)
    methods = {"knowledge", "progressive", "consistency", "reflow", "pointcloud", "guided"}
    assert methods | {"train", "sample", "bench", "schedule", "samplers", "export", "demo"} <= set(kinds)


@pytest.mark.parametrize("kind,args,needle", CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_bad_invocation_is_one_line_and_writes_nothing(fx, tmp_path, capsys, kind, args, needle):
    if any(RO in a for a in args) and not (sys.platform.startswith("linux") and os.path.isdir("/proc")):
        pytest.skip("needs Linux /proc for a folder nobody can write")
    work = tmp_path / "work"
    work.mkdir()
    argv = _argv(args, fx, work)
    before = _tree(fx, work)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert lines[0].startswith("fewstep") and ": error: " in lines[0], lines[0]
    assert needle in lines[0], (needle, lines[0])
    assert _tree(fx, work) == before, argv


# ------------------------------------------------------------------ the tables themselves
def test_every_option_has_a_rule_and_every_default_passes_it():
    """One rule per option: every key a command takes is in its table (so every value, from
    the command line or a config file, is checked), and every default passes its own rule."""
    from fewstep.methods import defaults, names, options, resolve
    from fewstep.train.config import TRAIN_DEFAULTS, TRAIN_OPTIONS
    from fewstep.train.config import resolve as resolve_train
    from fewstep.train.options import LOOP_OPTIONS, validate

    table = TRAIN_OPTIONS + LOOP_OPTIONS
    assert [o.name for o in table if o.name not in TRAIN_DEFAULTS] == []
    assert set(TRAIN_DEFAULTS) == {o.name for o in table}
    assert validate(dict(TRAIN_DEFAULTS), table) == TRAIN_DEFAULTS
    assert resolve_train({})["lr"] == TRAIN_DEFAULTS["lr"]
    for name in names():
        table, dflt = options(name), defaults(name)
        assert set(dflt) == {o.name for o in table}, name
        assert all(o.help for o in table), name
        assert validate(dict(dflt), table) == dflt, name
        cfg = resolve(name, {"teacher": "gmm:x.npz"})  # cross-field rules hold for the defaults
        assert {k: v for k, v in cfg.items() if k != "method"} == {**dflt, "teacher": "gmm:x.npz"}, name


def test_output_checks_accept_what_can_be_written(tmp_path):
    from fewstep.train.runfolder import check_output

    (tmp_path / "empty").mkdir()
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").write_text("{}")
    assert check_output(tmp_path / "empty") == tmp_path / "empty"
    assert check_output(tmp_path / "a" / "b" / "c", kind="teacher") == tmp_path / "a" / "b" / "c"
    assert check_output(tmp_path / "x.npz", file=True) == tmp_path / "x.npz"
    assert check_output(tmp_path / "report", allow=lambda p: (p / "results.json").is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "report"]  # the probes left nothing


def test_good_values_still_pass(tmp_path, capsys):
    """The largest seed, whole-number floats and the boundaries each rule allows."""
    from fewstep.methods import resolve

    cfg = resolve("consistency", {"teacher": "gmm:x.npz", "seed": 2**32 - 1, "steps": 10.0, "schedule": "ct",
                                  "s0": 2, "s1": 3, "mu": 0.0, "huber_c": 1e-6, "rho": 0.5, "tune_levels": 0})
    assert cfg["seed"] == 2**32 - 1 and type(cfg["steps"]) is int
    cfg = resolve("guided", {"teacher": "gmm:x.npz", "w_min": 0, "w_max": 0, "start_steps": 2, "end_steps": 1})
    assert cfg["w_min"] == 0.0 and cfg["w_max"] == 0.0
    cfg = resolve("knowledge", {"teacher": "gmm:x.npz", "net": json.dumps(NET), "label_dropout": 0.0})
    assert cfg["net"] == json.dumps(NET)
    assert resolve("reflow", {"data": "moons", "round_steps": "3,4"})["round_steps"] == "3,4"
