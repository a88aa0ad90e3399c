"""The playground's server, in this process over a real socket: labels on the disk in
the format reward.py reads, the reward-model and PPO jobs in the background, compare,
and every bad request answered with a status and one line. The page itself is driven
in headless Chromium by bench/drive_playground.py (not part of the suite)."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import copy_world

import cli
import playground
from data import world
from data.tokenizer import load_tokenizer
from records import load_rankings


@pytest.fixture
def server(world, stages, tmp_path):
    """A playground over the tiny world and the untrained stage checkpoints, serving on
    a free port; yields (base URL, Playground). Small jobs: 3 reward-model steps, PPO
    batches of 4."""
    w = copy_world(world, tmp_path / "w")
    cfg = cli.parse_config(playground.Config, [
        f"--data_dir={w}", f"--out={stages}", "--port=0", "--rm_steps=3", "--rm_batch=4",
        "--raters=8", "--ppo_batch=4", "--ppo_minibatch=2", "--ppo_epochs=1",
        "--max_new_tokens=8"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pg = playground.Playground(cfg)
    srv = playground.serve(pg, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", pg
    if pg.job is not None:
        pg.job.cancel.set()
        pg.thread.join(timeout=30)
    srv.shutdown()
    srv.server_close()
    torch.set_num_threads(threads)


def call(base, path, body=None, raw=None):
    """(status, JSON answer) of a GET (body None) or POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_job(base, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = call(base, "/api/state")[1]
        if s["job"] and not s["job"]["running"]:
            assert s["job"]["error"] is None, s["job"]
            return s
        time.sleep(0.05)
    raise AssertionError("the job did not end")


# --- pure functions -----------------------------------------------------------------------------


PAIR = dict(task={"kind": "add", "args": [2, 3], "prompt": "What is 2 + 3?"}, family="arithmetic",
            prompt="What is 2 + 3?", left=1,
            responses=[dict(text="2 + 3 = 5.", ended=True), dict(text="Sure! 2 + 3 = 6.",
                                                                  ended=True)])


def test_a_label_is_a_ranking_of_the_answers_not_of_their_places_on_the_page():
    # response 1 was shown as A: choosing A ranks response 1 first
    assert playground.label_record(PAIR, "A")["ranking"] == [1, 0]
    assert playground.label_record(PAIR, "B")["ranking"] == [0, 1]
    tie = playground.label_record(PAIR, "tie")
    assert "ranking" not in tie and tie["choice"] == "tie" and tie["left"] == 1


def test_the_verdict_is_the_raters_and_the_gold_scorers_on_the_shown_order():
    v = playground.verdict(PAIR, "A", world.RaterConfig())
    # A is "Sure! 2 + 3 = 6." (wrong, a preamble, 6 words to the ideal's 5):
    # gold 0.5 (format) - 0.4 (preamble) - 0.02 (one extra word) = 0.08; B is ideal, 1.5
    assert (v["gold_a"], v["gold_b"], v["gold_prefers"]) == (0.08, 1.5, "B")
    u_a, u_b = 3 * 0.08 + 0.12 * 6 + 1.5, 3 * 1.5 + 0.12 * 5
    assert v["raters_p_a"] == pytest.approx(1 / (1 + 2.718281828 ** (u_b - u_a)), abs=1e-3)
    assert v["raters_prefer"] == "B"


def test_a_typed_question_is_scored_when_it_is_one_of_the_worlds():
    t = world.task_of_prompt("  What is 12 +  7? ")
    assert (t.kind, t.args, world.answer_value(t)) == ("add", (12, 7), "19")
    assert world.task_of_prompt("Sort these numbers: 3 1 2").args == (3, 1, 2)
    assert world.task_of_prompt("What is the capital of Peru?").args == ("Peru",)
    for other in ("What is the capital of Atlantis?", "Hello", "Which is larger, 5 or 5?",
                  "How many letters are in 'Cat'?"):
        assert world.task_of_prompt(other) is None, other


# --- the server ---------------------------------------------------------------------------------


def test_labels_reach_the_disk_as_rankings_reward_py_reads(server):
    base, pg = server
    s = call(base, "/api/state")[1]
    first = s["pair"]["id"]
    status, s = call(base, "/api/label", {"pair": first, "choice": "A"})
    assert status == 200 and s["pair"]["id"] == first + 1 and s["counts"]["A"] == 1
    assert s["verdict"]["pair"] == first and s["verdict"]["choice"] == "A"
    call(base, "/api/label", {"pair": first + 1, "choice": "tie"})
    call(base, "/api/label", {"pair": first + 2, "choice": "B"})
    # another tab still showing the first pair: refused, nothing written
    status, err = call(base, "/api/label", {"pair": first, "choice": "B"})
    assert status == 409 and "no longer shown" in err["error"]
    lines = [json.loads(x) for x in open(pg.labels_path)]
    assert [x["choice"] for x in lines] == ["A", "tie", "B"]
    enc = load_tokenizer(pg.cfg.data_dir + "/tokenizer.tiktoken")
    rankings = load_rankings(pg.labels_path, enc, 10_000)  # the tie is left out
    assert len(rankings) == 2 and all(len(r["pairs"]) == 1 for r in rankings)
    assert all("gold" in r and "utility" in r for x in lines for r in x["responses"])


def test_a_label_that_cannot_be_written_is_refused_on_the_page(server):
    base, pg = server
    first = call(base, "/api/state")[1]["pair"]["id"]
    pg.labels_path = pg.cfg.data_dir  # a folder: the write fails, as on a full disk
    status, err = call(base, "/api/label", {"pair": first, "choice": "A"})
    assert status == 507 and err["error"].startswith(f"could not write {pg.cfg.data_dir}: ")
    assert call(base, "/api/state")[1]["counts"]["A"] == 0  # not counted, the pair still shown


@pytest.mark.parametrize("flags, needle", [
    (["--ppo_batch=32", "--ppo_minibatch=5"], "--ppo_minibatch=5 must split --ppo_batch=32"),
    (["--labels={file}/labels.jsonl"], "cannot write in"),
    (["--data_dir={bad_meta}"], "meta.json: not the meta.json data/prepare.py writes")])
def test_settings_that_cannot_work_are_refused_at_start(world, stages, tmp_path, flags, needle):
    (tmp_path / "file").write_text("")
    bad = copy_world(world, tmp_path / "bad_meta")
    (bad / "meta.json").write_text("{not json")
    flags = [f.format(file=tmp_path / "file", bad_meta=bad) for f in flags]
    cfg = cli.parse_config(playground.Config, [f"--data_dir={world}", f"--out={stages}",
                                               "--port=0", *flags])
    with pytest.raises(cli.UserError, match=needle.replace("(", r"\(")):
        playground.main(cfg)


def test_train_then_step_then_compare(server):
    base, pg = server
    status, err = call(base, "/api/step", {"steps": 1})
    assert status == 409 and "reward model first" in err["error"]
    status, s = call(base, "/api/train", {"raters": True})
    assert status == 200 and s["job"]["kind"] == "reward model"
    s = wait_job(base)
    rm = s["reward_model"]
    assert rm["rater_rankings"] == 8 and rm["labels"] == 0 and 0 <= rm["val_accuracy"] <= 1
    assert {r["style"] for r in rm["scored"]} == set(playground.SHOWCASE_STYLES)
    assert all(isinstance(r["reward"], float) for r in rm["scored"])
    pg.cfg.ppo_batch = len(pg.prompts) + 1  # more rollouts a step than there are prompts
    status, err = call(base, "/api/step", {"steps": 1})
    assert status == 409 and f"{len(pg.prompts)} training prompts" in err["error"]
    pg.cfg.ppo_batch = 4
    call(base, "/api/settings", {"beta": 0})
    status, s = call(base, "/api/step", {"steps": 2})
    assert status == 200
    s = wait_job(base)
    assert [p["step"] for p in s["history"]] == [1, 2] and s["iteration"] == 2
    assert all(p["beta"] == 0 for p in s["history"])
    assert {"reward", "gold", "kl", "length", "preamble", "correct"} <= set(s["history"][0])
    assert len(s["samples"]) == 4
    r = call(base, "/api/compare", {"prompt": "What is 2 + 3?"})[1]
    assert r["task"] == "add" and r["ideal"] == "2 + 3 = 5."
    assert [x["model"] for x in r["rows"]] == ["base", "SFT", "policy (PPO step 2)"]
    assert all(isinstance(x["gold"], float) and isinstance(x["reward"], float) for x in r["rows"])
    r = call(base, "/api/compare", {"prompt": "Tell me a story"})[1]
    assert r["task"] is None and all(x["gold"] is None for x in r["rows"])
    # a new reward model starts PPO again from SFT
    call(base, "/api/train", {"raters": True})
    s = wait_job(base)
    assert s["history"] == [] and s["iteration"] == 0


def test_a_job_refuses_a_second_one_and_settings_until_it_ends_and_can_be_cancelled(server):
    base, pg = server
    call(base, "/api/train", {"raters": True})
    wait_job(base)
    call(base, "/api/step", {"steps": 100})
    for path, body in (("/api/step", {"steps": 1}), ("/api/train", {"raters": True}),
                       ("/api/settings", {"beta": 0.5}), ("/api/reset", {})):
        status, err = call(base, path, body)
        assert status == 409 and "job is running" in err["error"], (path, err)
    assert call(base, "/api/state")[0] == 200  # the page still answers meanwhile
    status, s = call(base, "/api/cancel", {})
    assert status == 200 and s["job"]["cancelled"]
    s = wait_job(base)
    assert s["job"]["message"] == "cancelled" and s["job"]["done"] < 100
    assert call(base, "/api/cancel", {})[0] == 409  # nothing left to cancel


@pytest.mark.parametrize("method,path,body,status,needle", [
    ("GET", "/api/nothing", None, 404, "no such page"),
    ("POST", "/api/nothing", {}, 404, "no such route"),
    ("POST", "/api/label", b"{not json", 400, "JSON object"),
    ("POST", "/api/label", b"[1, 2]", 400, "JSON object"),
    ("POST", "/api/label", b"[" * 100_000, 400, "JSON object"),  # too deep to read
    ("POST", "/api/label", {"pair": "1", "choice": "A"}, 400, "'pair' should be an integer"),
    ("POST", "/api/label", {"pair": 1, "choice": "C"}, 400, "expected A, B, tie or skip"),
    ("POST", "/api/train", {}, 400, "label at least 2 pairs"),
    ("POST", "/api/train", {"raters": "yes"}, 400, "'raters' should be true or false"),
    ("POST", "/api/step", {"steps": 0}, 400, "expected 1 to 100"),
    ("POST", "/api/step", {"steps": True}, 400, "'steps' should be an integer"),
    ("POST", "/api/settings", {"beta": -1}, 400, "from 0 to 10"),
    ("POST", "/api/settings", {}, 400, "'beta' should be a number"),
    ("POST", "/api/compare", {"prompt": "  "}, 400, "empty"),
    ("POST", "/api/compare", {"prompt": "word " * 500}, 400, "fit"),
    ("POST", "/api/cancel", {}, 409, "no job is running"),
])
def test_a_bad_request_gets_a_status_and_one_line(server, capsys, method, path, body, status,
                                                  needle):
    base, _ = server
    raw = body if isinstance(body, bytes) else None
    got, answer = call(base, path, None if raw else body, raw=raw)
    assert got == status and needle in answer["error"] and "\n" not in answer["error"]
    assert set(answer) == {"error"}
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out


def test_the_page_is_served_and_a_restart_keeps_the_labels(server, tmp_path):
    base, pg = server
    with urllib.request.urlopen(base + "/") as r:
        page = r.read().decode()
    assert r.headers["Content-Type"].startswith("text/html") and "/api/state" in page
    assert "http" not in page.replace("http://", "").split("<script>")[1]  # nothing fetched
    s = call(base, "/api/state")[1]
    call(base, "/api/label", {"pair": s["pair"]["id"], "choice": "B"})
    with open(pg.labels_path, "a") as f:
        f.write('{"prompt": "What is')  # what a kill in the middle of a write leaves
    again = playground.Playground(pg.cfg)
    assert again.counts == {"A": 0, "B": 1, "tie": 0, "skip": 0}
    assert open(pg.labels_path).read().endswith("}\n")  # the damaged line is cut off


def test_a_port_beyond_65535_is_refused_in_one_line():
    cfg = cli.parse_config(playground.Config, ["--port=99999"])
    with pytest.raises(cli.UserError, match=r"--port=99999: a port is at most 65535"):
        playground.main(cfg)
