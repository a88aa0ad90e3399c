"""cai.py end to end on the tiny pipeline: the demonstrations, the critic, the labels and
their agreement figures written (the tiny critic learns little in three steps)."""

import json

from conftest import copy_world, main_of

import cai


def test_cai_end_to_end_on_the_tiny_pipeline(pipeline, tmp_path, capsys):
    data = copy_world(pipeline.data, tmp_path / "world")
    out = tmp_path / "cai"
    main_of(cai, [f"--data_dir={data}", f"--init_from={pipeline.out}/sft", f"--out_dir={out}",
                  "--n_critiques=60", "--n_judgements=30", "--n_sft=30", "--critic_steps=3",
                  "--n_prompts=100", "--max_new_tokens=16"])
    printed = capsys.readouterr().out
    figures = json.loads((out / "agreement.json").read_text())
    assert figures["drafts"] == 16  # every training prompt of the tiny world
    assert set(figures) >= {"revision", "judge", "raters"}
    assert "| AI: the judge |" in printed and (out / "critic" / "ckpt.pt").exists()
    demos = [json.loads(x) for x in (out / "demos.jsonl").read_text().splitlines()]
    assert {d["kind"] for d in demos} == {"critique", "judgement", "answer"}
    # the judge's pairs and the raters' are the same pairs, written when there are two or more
    if figures["judge"]["pairs"] >= 2:
        judged = [json.loads(x) for x in (data / "prefs_cai_judge_train.jsonl").read_text()
                  .splitlines()]
        rated = [json.loads(x) for x in (data / "prefs_cai_raters_train.jsonl").read_text()
                 .splitlines()]
        assert [sorted(r["text"] for r in x["responses"]) for x in judged] == \
               [sorted(r["text"] for r in x["responses"]) for x in rated]
