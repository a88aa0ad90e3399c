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
        0: {"loss": 13.202509880065918, "grad_norm": 254.2450714111328},
        1: {"loss": 4.071044445037842, "grad_norm": 78.99491119384766,
            "val_accuracy": 0.3333333333333333},
        2: {"loss": 9.039464950561523, "grad_norm": 186.2490997314453},
        3: {"loss": 10.733979225158691, "grad_norm": 225.8406982421875,
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
            "val/loss": 0.6925817131996155, "objective/kl": 1.1920928955078125e-07},
    },
    "ppo": {
        # iteration 0: the rollouts come from the SFT weights, so the KL is 0; most responses
        # do not end within 8 tokens yet and score --missing_end_penalty (-3)
        0: {"loss/policy": -0.0008136481046676636, "loss/value": 2.8757253289222717,
            "objective/kl": 0.0, "objective/score": -2.766552209854126,
            "objective/entropy": 5.648183822631836,
            "policy/approxkl": 1.345519912376858e-06,
            "value/explained_variance": 0.00025719404220581055, "rollout/length": 8.0,
            "gold/score": -0.0024999999441206455},
        1: {"loss/policy": -0.0002499222755432129, "loss/value": 2.8088693618774414,
            "objective/kl": -0.001595914363861084, "objective/score": -2.5611801147460938,
            "objective/entropy": 5.648332595825195, "policy/approxkl": 1.936036122529572e-07,
            "value/explained_variance": 0.0001017451286315918, "rollout/length": 8.0,
            "gold/score": 0.0},
        2: {"loss/policy": -9.059160947799683e-05, "loss/value": 3.181846559047699,
            "objective/kl": 0.000731050968170166, "objective/score": -3.0,
            "objective/entropy": 5.6483941078186035, "policy/approxkl": 2.645083618801891e-08,
            "value/explained_variance": 0.0008503198623657227, "rollout/length": 8.0,
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
