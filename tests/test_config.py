"""Configuration: every shipped config composes and runs; bad input stops with one line."""

from __future__ import annotations

import pytest

from safeprobe.config import CONF_DIR, ConfigError, check_cli_overrides, validate
from safeprobe.methods import METHODS, fine_tuning_methods
from safeprobe.pipeline import run
from tests.conftest import run_script

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SYNTHETIC_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("synthetic")]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(make_cfg, experiment):
    c = validate(make_cfg(f"experiment={experiment}", fast=False))
    assert c.method.name in METHODS


@pytest.mark.parametrize("method", ["sft", "sap"])
@pytest.mark.parametrize("experiment", SYNTHETIC_EXPERIMENTS)
def test_every_synthetic_experiment_runs_a_step(make_cfg, micro, experiment, method):
    # experiments on real models run a step on tiny stand-ins in test_real_experiments.py
    results = run(make_cfg(f"experiment={experiment}", f"method={method}", "trainer.max_steps=1", "eval.n_harmful=2",
                           "eval.n_task=2"))
    assert results["train"]["steps"] == 1


@pytest.mark.parametrize("group", ["model", "adapter", "method", "probe", "data", "eval", "trainer", "logger"])
def test_every_group_option_validates(make_cfg, group):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        validate(make_cfg(f"{group}={option}", fast=False))


BAD = {
    "misspelled key": (["probe.epss=0.1"], "unknown key 'probe.epss'; allowed keys under 'probe': eps, harmful_step"),
    "misspelled key in a yaml": (["+probe.epss=0.1"], "unknown key 'probe.epss'; allowed keys under 'probe': eps"),
    "negative eps": (["probe.eps=-0.1"], "probe.eps=-0.1 is invalid; allowed: a number >= 0"),
    "layer beyond depth": (["model=synthetic_micro", "probe.layers=[2,4]"],
                           "probe.layers=[2, 4] is invalid; allowed: decoder-layer indices in [0, 3] (the model has 4 layers)"),
    "poison ratio": (["data.poison_ratio=1.5"], "data.poison_ratio=1.5 is invalid; allowed: a number in [0, 1]"),
    "unknown method": (["method=dpo"], f"method=dpo is not a known option; allowed: {', '.join(fine_tuning_methods())}"),
    "unknown method in a sweep": (["-m", "method=sft,dpo"], "method=dpo is not a known option; allowed: csft, ldifs"),
    "method key of the default method": (["method.rhoo=1"], "unknown key 'method.rhoo' for method=sap; allowed keys under 'method': name"),
    "method key of another method": (["method=sft", "method.rho=1"], "unknown key 'method.rho' for method=sft; allowed keys under 'method': name"),
    "misspelled method key": (["method=lisa", "method.rhoo=1"], "unknown key 'method.rhoo' for method=lisa; allowed keys under 'method': name, align_steps"),
    "method key in a sweep over methods": (["-m", "method=lisa,ldifs", "method.rho=2"],
                                           "a sweep over methods composes the default method first, which lacks 'method.rho'; write it as '++method.rho=2'"),
    "bad method value": (["method=lisa", "method.rho=-1"], "method.rho=-1.0 is invalid; allowed: a number >= 0"),
    "misspelled key in a free-form mapping": (["model=synthetic_micro", "model.arch.hiden_size=8"],
                                              "unknown key 'model.arch.hiden_size' in the free-form mapping 'model.arch', "
                                              "which holds hidden_size, intermediate_size"),
    "unquoted sweep folder": (["paths.output_dir=multirun/x/0_method=sap,seed=0"],
                              "cannot read 'paths.output_dir=multirun/x/0_method=sap,seed=0'; quote a value that holds "
                              "'=', ',' or spaces (a sweep job's folder does), e.g. \"paths.output_dir='multirun/x/0_method=sap,seed=0'\""),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_config_stops_before_training_with_one_line(tmp_path, cache_dir, case):
    args, message = BAD[case]
    proc = run_script("train.py", *args, f"paths.root_dir={tmp_path}", "logger=csv", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert errors == [f"config error: {message}"] or (len(errors) == 1 and message in errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("metrics.csv"))


def test_cli_check_leaves_hydra_syntax_alone():
    check_cli_overrides(["+probe.new=1", "~probe.eps", "hydra.verbose=true", "probe.eps=0.1,0.2", "-m",
                         "model.arch.hidden_size=64", "hydra/launcher=basic"])
    with pytest.raises(ConfigError, match="allowed keys under 'optim'"):
        check_cli_overrides(["optim.learning_rate=1"])
    # a key inside a free-form mapping: one the chosen option's mapping holds, or added with '+'
    check_cli_overrides(["model=synthetic_micro", "model.arch.num_hidden_layers=2", "+model.arch.rope_theta=100.0"])
    with pytest.raises(ConfigError, match=r"write '\+model.arch.rope_theta=100.0'"):
        check_cli_overrides(["model=synthetic_micro", "model.arch.rope_theta=100.0"])
