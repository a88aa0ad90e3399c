"""overopt.py end to end on the tiny pipeline's SFT and reward models: a PPO run at
β = 0 (its own process, as overopt.py starts it) and best-of-1 and 2, evaluated here."""

import json
import math

import pytest
from conftest import ROOT, close, main_of

import eval as evaluation
import overopt
from cli import UserError

# the points of this run: (method, KL, proxy, gold), golden figures but for best-of-n's KL,
# which is the bound log n − (n−1)/n
POINTS = [("PPO β=0", -0.011223024792141385, 1.138629886839125, -0.0022222222222222222),
          ("best-of-n n=1", 0.0, 0.19237211015489367, -0.0011111111111111111),
          ("best-of-n n=2", math.log(2) - 0.5, 0.6428182390001085, -0.0011111111111111111)]


def test_overopt_end_to_end(pipeline, tmp_path, capsys, monkeypatch):
    """The points, the PPO path, the report; a rerun reuses the finished run; eval.py
    copies the section into out/report.md."""
    monkeypatch.chdir(ROOT)  # overopt.py starts `python ppo.py` from the repository root
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "overopt"
    args = [f"--data_dir={pipeline.data}", f"--sft_from={pipeline.out}/sft",
            f"--reward_from={pipeline.out}/reward", f"--out_dir={out}", "--seeds=1", "--betas=0",
            "--best_of=1,2", "--iterations=2", "--max_new_tokens=8",
            "--ppo_flags=--batch_size=8 --minibatch_size=4 --ppo_epochs=2 --max_new_tokens=8"]
    main_of(overopt, args)
    res = json.loads((out / "results.json").read_text())
    got = [(p["method"], p["kl"], p["proxy"], p["gold"]) for p in res["points"]]
    assert [g[0] for g in got] == [p[0] for p in POINTS]
    for g, p in zip(got, POINTS):
        assert g[1:] == (close(p[1], "objective/kl"), close(p[2]), close(p[3])), g
    # best-of-n's KL is the bound log n − (n−1)/n
    assert res["points"][1]["kl"] == 0
    assert res["points"][2]["kl"] == pytest.approx(math.log(2) - 0.5, rel=1e-12)
    assert all(p["sqrt_kl"] == math.sqrt(max(p["kl"], 0)) for p in res["points"])
    path = res["paths"]["seed1_beta0"]
    assert [p["step"] for p in path] == [0, 1] and path[0]["kl"] == pytest.approx(0, abs=1e-4)
    report = (out / "report.md").read_text()
    assert "| 1 | PPO β=0 |" in report
    assert ("overopt.png" in report) == (out / "overopt.png").exists()
    capsys.readouterr()
    main_of(overopt, args)
    assert "finished earlier" in capsys.readouterr().out
    # the same folder with other PPO settings: refused, not reused with the old figures
    other = [*args[:-1], args[-1] + " --ptx_coef=0.5"]
    with pytest.raises(UserError, match=r"seed1_beta0 holds a PPO run with other settings "
                                        r"\(ptx_coef\)"):
        main_of(overopt, other)
    # ppo.py's own refusal of a flag stops overopt.py in its one line, leaving no folder
    fresh = [*args[:3], f"--out_dir={tmp_path}/refused", *args[4:-1],
             "--ppo_flags=--batch_size=6 --minibatch_size=4 --max_new_tokens=8"]
    with pytest.raises(UserError, match=r"ppo.py \(run seed1_beta0\) stopped: "
                                        r"--minibatch_size=4 must split --batch_size=6"):
        main_of(overopt, fresh)
    assert not (tmp_path / "refused").exists()
    for stage in ("sft", "reward"):
        (tmp_path / stage).symlink_to(pipeline.out / stage)
    main_of(evaluation, [f"--data_dir={pipeline.data}", f"--out={tmp_path}",
                         "--max_new_tokens=8", "--best_of=2"])
    assert "## Over-optimisation" in (tmp_path / "report.md").read_text()
