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
        4: {"loss": 5.2680253982543945, "grad_norm": 0.9879165291786194},
        5: {"loss": 5.128033638000488, "grad_norm": 0.9290391802787781,
            "val_loss": 4.989707291126251},
        8: {"loss": 4.812944412231445, "grad_norm": 0.6928789019584656},
    },
    "sft": {
        0: {"loss": 4.868311918444103, "grad_norm": 1.2287507057189941},
        1: {"loss": 4.851409281651998, "grad_norm": 1.3397421836853027},
        2: {"loss": 4.865392331057375, "grad_norm": 0.9839915037155151,
            "val_loss": 4.879449367523193},
        3: {"loss": 4.80914166807397, "grad_norm": 0.8589211106300354},
    },
    "reward": {
        0: {"loss": 12.251888062272752, "grad_norm": 225.04359436035156},
        1: {"loss": 1.9967309832572937, "grad_norm": 32.008544921875,
            "val_accuracy": 0.3333333333333333},
        2: {"loss": 8.012061357498169, "grad_norm": 150.18751525878906},
        3: {"loss": 10.077942848205566, "grad_norm": 174.45542907714844,
            "val_accuracy": 0.3333333333333333},
    },
    "dpo": {
        # step 0: the policy is the reference, so the loss is log 2 and the margin 0
        0: {"loss": 0.6931472718715668, "grad_norm": 1.1238081455230713, "rewards/margin": 0.0,
            "logps/chosen": -141.44377994537354},
        1: {"loss": 0.6929120719432831, "grad_norm": 1.1643704175949097,
            "rewards/margin": 0.00047035221359692514, "logps/chosen": -127.39842700958252},
        2: {"loss": 0.6930951327085495, "grad_norm": 0.5831788778305054,
            "rewards/margin": 0.00010452272272232221, "logps/chosen": -82.54761075973511,
            "val/loss": 0.6924067139625549, "objective/kl": -0.0025277137756347656},
    },
    "ppo": {
        # iteration 0: the rollouts come from the SFT weights, so the KL is 0; most responses
        # do not end within 8 tokens yet and score --missing_end_penalty (-3)
        0: {"loss/policy": -0.002200968563556671, "loss/value": 2.8383674025535583,
            "objective/kl": 0.0, "objective/score": -2.6933228969573975,
            "objective/entropy": 5.500362396240234, "policy/approxkl": 2.2887134036864154e-05,
            "value/explained_variance": -0.0010186433792114258, "rollout/length": 8.0,
            "gold/score": -0.0024999999441206455},
        1: {"loss/policy": -0.0008075013756752014, "loss/value": 2.8083059787750244,
            "objective/kl": -0.0033468008041381836, "objective/score": -2.6325464248657227,
            "objective/entropy": 5.468304634094238, "policy/approxkl": 3.94264873193606e-06,
            "value/explained_variance": 0.00025194883346557617, "rollout/length": 8.0,
            "gold/score": -0.004999999888241291},
        2: {"loss/policy": -0.0003004297614097595, "loss/value": 3.199804425239563,
            "objective/kl": -0.01044541597366333, "objective/score": -3.0,
            "objective/entropy": 5.507523536682129, "policy/approxkl": 6.349522010395958e-07,
            "value/explained_variance": -0.008030533790588379, "rollout/length": 8.0,
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
