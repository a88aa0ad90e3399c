"""A golden trajectory: the first logged figures of every training stage of the tiny
pipeline (`pipeline.py --quick`: the world and every stage on fixed seeds), as the code
computed them when this test was written. A silent change to the numbers (a loss, a
mask, a schedule, the data order, a seed) fails here, while the small float differences
between CPUs pass: rel 1e-4, abs 1e-6, and abs 2e-5 for the figures that are small
differences of large float32 sums (a sampled KL: Σ of log π − log π_ref over a response;
the policy loss while the ratio is 1 within 1e-3; DPO's reward margin), whose rounding
is absolute. Read from the pipeline fixture's logs, so it costs no run of its own.

If a change to the numbers is meant, rerun the pipeline and copy the new figures here,
saying in the commit why they moved."""

import pytest
from conftest import close, read_log

# stage: {step: {figure: value}}; pretraining logs every 4th step and its evaluations
GOLDEN = {
    "pretrain": {
        0: {"loss": 5.786135673522949, "grad_norm": 0.4143019914627075},
        4: {"loss": 5.437418460845947, "grad_norm": 0.7623854279518127},
        5: {"loss": 5.367804527282715, "grad_norm": 0.7317469716072083,
            "val_loss": 5.29523891210556},
        8: {"loss": 5.1922407150268555, "grad_norm": 0.676687479019165},
    },
    "sft": {
        0: {"loss": 5.176477432250977, "grad_norm": 0.8967538475990295},
        1: {"loss": 5.156055450439453, "grad_norm": 0.940166711807251},
        2: {"loss": 5.177621364593506, "grad_norm": 0.8327534198760986,
            "val_loss": 5.148799419403076},
        3: {"loss": 5.140603542327881, "grad_norm": 0.803741455078125},
    },
    "reward": {
        0: {"loss": 13.91993522644043, "grad_norm": 267.76263427734375},
        1: {"loss": 2.150146722793579, "grad_norm": 37.907840728759766,
            "val_accuracy": 0.3333333333333333},
        2: {"loss": 9.225929260253906, "grad_norm": 189.60311889648438},
        3: {"loss": 10.329813003540039, "grad_norm": 217.4071502685547,
            "val_accuracy": 0.3333333333333333},
    },
    "dpo": {
        # step 0: the policy is the reference, so the loss is log 2 and the margin 0
        0: {"loss": 0.6931471824645996, "grad_norm": 1.0321043729782104, "rewards/margin": 0.0,
            "logps/chosen": -152.9332733154297},
        1: {"loss": 0.6929190158843994, "grad_norm": 1.0013492107391357,
            "rewards/margin": 0.0004565715789794922, "logps/chosen": -136.54347229003906},
        2: {"loss": 0.6930457353591919, "grad_norm": 0.4415120482444763,
            "rewards/margin": 0.00020303727069403976, "logps/chosen": -88.3744888305664,
            "val/loss": 0.6925817131996155, "objective/kl": -0.0004684925079345703},
    },
    "ppo": {
        # iteration 0: the rollouts come from the SFT weights, so the KL is 0; no response
        # ends within 8 tokens yet, so every score is --missing_end_penalty
        0: {"loss/policy": -0.0008187070488929749, "loss/value": 3.2144426107406616,
            "objective/kl": 0.0, "objective/score": -3.0, "objective/entropy": 5.648303031921387,
            "policy/approxkl": 1.3304785113632533e-06,
            "value/explained_variance": 0.000663459300994873, "rollout/length": 8.0,
            "gold/score": 0.0},
        1: {"loss/policy": -0.0003035031259059906, "loss/value": 3.1886406540870667,
            "objective/kl": -0.0006319284439086914, "objective/score": -3.0,
            "objective/entropy": 5.648017883300781, "policy/approxkl": 3.2424245510753735e-07,
            "value/explained_variance": 0.000981152057647705, "rollout/length": 8.0,
            "gold/score": -0.007499999832361937},
        2: {"loss/policy": -0.00011186301708221436, "loss/value": 3.1737070083618164,
            "objective/kl": 0.00045299530029296875, "objective/score": -3.0,
            "objective/entropy": 5.648240566253662, "policy/approxkl": 4.502937578365618e-08,
            "value/explained_variance": 0.0008416175842285156, "rollout/length": 8.0,
            "gold/score": -0.004999999888241291},
    },
}


@pytest.mark.parametrize("stage", list(GOLDEN))
def test_golden_trajectory(pipeline, stage):
    log = {r["step"]: r for r in read_log(pipeline.out / stage / "log.jsonl")}
    for step, figures in GOLDEN[stage].items():
        assert step in log, (stage, step, sorted(log))
        got = {k: log[step].get(k) for k in figures}
        assert got == {k: close(v, k) for k, v in figures.items()}, (stage, step)
