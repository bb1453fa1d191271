"""One table of training-loop options (fewstep.train.options) for `fewstep train` and every
`fewstep distill METHOD`: the same flags, the table's defaults, one validation that refuses
every value that cannot be meant, from the command line or a JSON config file, in one line."""
import json
import math

import numpy as np
import pytest

from fewstep.cli import build_parser, main
from fewstep.errors import UserError
from fewstep.train.options import LOOP_NAMES, LOOP_OPTIONS, cli_number, option, validate_loop


def _subparser(*path):
    p = build_parser()
    for name in path:
        sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
        p = sub.choices[name]
    return p


def _flags(parser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings}


COMMANDS = {"train": ("train",), "distill": ("distill", "knowledge")}


def test_table_covers_the_loop_options():
    assert LOOP_NAMES == ("steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "ema_decay", "seed",
                          "device", "mixed_precision", "checkpoint_every", "keep_checkpoints", "log_every")
    for o in LOOP_OPTIONS:
        assert o.help and o.type in (int, float, str)
        assert validate_loop({o.name: o.default})[o.name] == o.default  # every default passes its own check


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_loop_option_is_a_flag_with_help(command):
    parser = _subparser(*COMMANDS[command])
    flags, text = _flags(parser), parser.format_help()
    for o in LOOP_OPTIONS:
        assert o.flag in flags and o.flag in text, (command, o.flag)
        a = flags[o.flag]
        assert a.dest == o.name and a.default is None  # not given -> config file, then the default
        assert o.help.split(";")[0].split(",")[0] in " ".join(a.help.split())


def test_defaults_come_from_the_table():
    from fewstep.methods import defaults, names
    from fewstep.methods.common import COMMON_DEFAULTS
    from fewstep.train.config import TRAIN_DEFAULTS, TRAIN_LOOP_OVERRIDES, resolve

    assert set(TRAIN_LOOP_OVERRIDES) == {"lr"} and TRAIN_LOOP_OVERRIDES["lr"] == 2e-3  # teachers train as before
    assert option("lr").default == 1e-3
    train_cfg = resolve({})
    for o in LOOP_OPTIONS:
        want = TRAIN_LOOP_OVERRIDES.get(o.name, o.default)
        assert TRAIN_DEFAULTS[o.name] == want and train_cfg[o.name] == want
        assert COMMON_DEFAULTS[o.name] == o.default
        assert defaults("knowledge")[o.name] == o.default
    for name in names():  # a method may override a default (pointcloud: smaller batches), never the set
        assert set(LOOP_NAMES) <= set(defaults(name))
    # the help shows each command's default; train's lr says why it differs
    train_help = {k: " ".join(a.help.split()) for k, a in _flags(_subparser("train")).items()}
    distill_help = {k: " ".join(a.help.split()) for k, a in _flags(_subparser("distill", "knowledge")).items()}
    shown = lambda v: repr(v) if isinstance(v, float) else str(v)  # noqa: E731
    for o in LOOP_OPTIONS:
        if o.default is not None:
            assert f"(default {shown(TRAIN_DEFAULTS[o.name])}" in train_help[o.flag], train_help[o.flag]
            assert f"(default {shown(o.default)}" in distill_help[o.flag], distill_help[o.flag]
    assert "existing teachers" in train_help["--lr"] and "0.001" in train_help["--lr"]


# values that cannot be meant, as typed on the command line
BAD_CLI = [
    ("steps", "0"), ("steps", "-3"), ("steps", "2.5"), ("steps", "abc"), ("steps", "nan"),
    ("batch_size", "0"), ("batch_size", "1.5"),
    ("checkpoint_every", "0"), ("log_every", "0"), ("log_every", "2.5"), ("keep_checkpoints", "0"),
    ("lr", "0"), ("lr", "-1e-3"), ("lr", "nan"), ("lr", "inf"), ("lr", "abc"),
    ("warmup", "-1"), ("warmup", "1.5"), ("weight_decay", "-0.1"), ("weight_decay", "nan"),
    ("grad_clip", "-1"), ("grad_clip", "inf"),
    ("ema_decay", "1"), ("ema_decay", "1.5"), ("ema_decay", "-0.1"), ("ema_decay", "nan"),
    ("mixed_precision", "fp32"), ("mixed_precision", "yes"),
    ("device", "gpu"), ("device", "cuda:x"), ("device", "cuda1"),
    ("seed", "1.5"), ("seed", "abc"),
]

# values that cannot be meant, as written in a JSON config file (types included)
BAD_JSON = [
    ("steps", 0), ("steps", 2.5), ("steps", True), ("steps", "100"), ("steps", None), ("steps", [10]),
    ("batch_size", False), ("batch_size", -1), ("checkpoint_every", 0), ("log_every", 0.5), ("keep_checkpoints", 0),
    ("lr", "abc"), ("lr", 0), ("lr", float("nan")), ("lr", float("inf")), ("lr", True),
    ("warmup", -5), ("weight_decay", -1), ("weight_decay", float("-inf")), ("grad_clip", -0.5),
    ("ema_decay", 1.0), ("ema_decay", "0.99"),
    ("mixed_precision", "fp32"), ("mixed_precision", False), ("mixed_precision", None),
    ("device", "gpu"), ("device", 0),
    ("seed", 1.5), ("seed", "0"), ("seed", None),
]


def _base(command, gmm_spec, out):
    if command == "train":
        return ["train", "--data", "moons", "--out", str(out), "--quiet"]
    return ["distill", "knowledge", "--teacher", gmm_spec, "--out", str(out), "--quiet"]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name,value", BAD_CLI)
def test_bad_value_on_the_command_line(tmp_path, gmm_spec, capsys, command, name, value):
    flag = option(name).flag
    code = main(_base(command, gmm_spec, tmp_path / "r") + [f"{flag}={value}"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and flag in line and f"got {cli_number(value)}" in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name,value", BAD_JSON)
def test_bad_value_in_the_config_file(tmp_path, gmm_spec, capsys, command, name, value):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({name: value}))  # NaN / Infinity: Python's JSON reads them too
    code = main(_base(command, gmm_spec, tmp_path / "r") + ["--config", str(cfg)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f'"{name}"' in line and "cfg.json" in line, line
    assert not (tmp_path / "r").exists()


def test_command_line_beats_a_bad_file_value(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"lr": "abc", "log_every": 0}))  # lr is checked before log_every
    code = main(["train", "--data", "moons", "--out", str(tmp_path / "r"), "--config", str(cfg), "--lr", "1e-3"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and '"log_every" (--log-every)' in line and '"lr"' not in line, line
    code = main(["train", "--data", "moons", "--out", str(tmp_path / "r"), "--config", str(cfg), "--lr", "-1",
                 "--log-every", "5"])
    line = _one_line(capsys.readouterr().err)  # a command-line value is named as the flag
    assert code == 2 and line.startswith("fewstep train: error: --lr must") and "cfg.json" not in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_resume_with_bad_steps_is_one_line(tmp_path, command, capsys):
    args = ["train"] if command == "train" else ["distill", "knowledge"]
    code = main(args + ["--resume", "--out", str(tmp_path / "r"), "--steps", "abc"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "--steps" in line


def test_validate_loop_normalises_and_allows_what_can_be_meant():
    cfg = validate_loop({"steps": 2000.0, "lr": 1, "seed": np.int64(3), "batch_size": np.int32(8),
                         "device": None, "keep_checkpoints": None, "grad_clip": 0, "ema_decay": 0.0,
                         "warmup": 0, "mixed_precision": "bf16", "other": "untouched"})
    assert cfg["steps"] == 2000 and type(cfg["steps"]) is int
    assert cfg["lr"] == 1.0 and type(cfg["lr"]) is float
    assert cfg["seed"] == 3 and type(cfg["seed"]) is int and type(cfg["batch_size"]) is int
    assert cfg["device"] is None and cfg["keep_checkpoints"] is None and cfg["other"] == "untouched"
    for device in ("cpu", "cuda", "cuda:0", "cuda:12"):
        assert validate_loop({"device": device})["device"] == device
    assert validate_loop({"seed": 2**32 - 1})["seed"] == 2**32 - 1
    for bad in ({"seed": -1}, {"seed": 2**32}, {"seed": 2**64}, {"steps": math.nan}, {"lr": np.float64("inf")}, {"steps": np.bool_(True)}):
        with pytest.raises(UserError):
            validate_loop(bad)


def test_train_with_good_options_still_works(tmp_path, capsys):
    """The tiny run of the brief, with the three flags `fewstep train` lacked before and a
    config file (whole-number floats are whole numbers; a short final evaluation)."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"checkpoint_every": 1.0, "eval_samples": 200, "eval_nfe": 5}))
    out = tmp_path / "run"
    code = main(["train", "--steps", "2", "--batch-size", "8", "--data", "moons", "--n-data", "64", "--quiet",
                 "--device", "cpu", "--weight-decay", "0.01", "--keep-checkpoints", "1", "--log-every", "1",
                 "--config", str(cfg), "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    stored = json.loads((out / "config.json").read_text())
    assert stored["steps"] == 2 and stored["batch_size"] == 8 and stored["weight_decay"] == 0.01
    assert stored["keep_checkpoints"] == 1 and stored["log_every"] == 1 and stored["checkpoint_every"] == 1
    assert type(stored["checkpoint_every"]) is int and stored["lr"] == 2e-3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]  # keep 1
    assert (out / "eval.json").is_file() and (out / "model.safetensors").is_file()
