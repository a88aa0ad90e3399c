"""The playground as a user starts and stops it: --help, a missing stage named with the
command that makes it (in this process), and Ctrl-C while a job runs, which ends the
server cleanly with every label on the disk."""

import json
import signal
import subprocess
import sys
import urllib.request

from conftest import ROOT, assert_user_error_in_process, environ, run

import playground


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_help_and_a_missing_stage(world, capsys):
    p = run("playground.py", "--help")
    assert p.returncode == 0 and "--port" in p.stdout and "--beta" in p.stdout
    assert_user_error_in_process(capsys, playground, f"--data_dir={world}",
                                 "--out=/nonexistent-out", needles=["python pretrain.py"])


def test_ctrl_c_during_a_job_stops_cleanly_and_keeps_the_labels(world, stages, tmp_path):
    labels = tmp_path / "labels.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "playground.py", f"--data_dir={world}", f"--out={stages}", "--port=0",
         f"--labels={labels}", "--rm_steps=100000", "--max_new_tokens=8"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ())
    try:
        first = proc.stdout.readline()
        assert first.startswith("playground: http://127.0.0.1:"), first
        url = first.split()[1].rstrip("/")
        with urllib.request.urlopen(url + "/api/state", timeout=60) as r:
            pair = json.loads(r.read())["pair"]["id"]
        post(url + "/api/label", {"pair": pair, "choice": "A"})
        post(url + "/api/label", {"pair": pair + 1, "choice": "skip"})
        s = post(url + "/api/train", {"raters": True})  # a job that would run for hours
        assert s["job"]["running"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)  # seconds when quiet; a loaded CI is slower
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err == "", err
    assert out.strip().endswith(f"stopped; 2 label(s) in {labels}")
    assert [json.loads(x)["choice"] for x in labels.read_text().splitlines()] == ["A", "skip"]
