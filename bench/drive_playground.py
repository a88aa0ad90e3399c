"""Drives the playground's real page in headless Chromium, the keyboard only, through
the whole path a learner takes, and measures it: the page shown after the command
starts, 20 pairs labelled (like the gold scorer would, reading the page), a reward
model trained, 10 PPO steps, one compare; a screenshot of each view; the server's
latency while PPO runs; then (--hack_steps) β = 0 for a few dozen more steps, to
show the reward model's score and the gold score parting.

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver),
which it talks to over the W3C WebDriver protocol (plain HTTP), and a trained out/:

    python bench/drive_playground.py --out=out --data_dir=data/world --shots=/tmp/shots
    python bench/drive_playground.py --hack_steps=40 --raters=true

Prints one line per phase and a JSON summary at the end.
"""

import base64
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import parse_config, user_errors  # noqa: E402
from data import world  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Config:
    out: str = "out"                  # the trained stages the playground reads
    data_dir: str = "data/world"      # the world
    shots: str = "playground-shots"   # screenshots go here
    labels: int = 20                  # pairs to label
    raters: bool = True               # train on the simulated raters' rankings too
    steps: int = 10                   # PPO steps through the page
    hack_steps: int = 0               # then this many steps at β = 0 (through the API)
    chromium: str = "/usr/bin/chromium"
    chromedriver: str = "/usr/bin/chromedriver"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return json.loads(e.read() or b"null")


class Browser:
    """The few WebDriver commands the drive needs."""

    def __init__(self, cfg, profile):
        self.port = free_port()
        self.proc = subprocess.Popen([cfg.chromedriver, f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                http("GET", self.base + "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,1000"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": cfg.chromium, "args": args}}}}
        answer = http("POST", self.base + "/session", caps)["value"]
        if "sessionId" not in answer:
            raise SystemExit(f"chromedriver refused the session: {answer}")
        self.session = f"{self.base}/session/{answer['sessionId']}"

    def go(self, url):
        http("POST", self.session + "/url", {"url": url})

    def js(self, script, *args):
        return http("POST", self.session + "/execute/sync", {"script": script,
                                                             "args": list(args)})["value"]

    def text(self, css):
        return self.js("const e = document.querySelector(arguments[0]); "
                       "return e ? e.innerText : null;", css)

    def keys(self, text):
        """Real key presses, one after another, to whatever has the focus."""
        acts = [a for ch in text for a in ({"type": "keyDown", "value": ch},
                                           {"type": "keyUp", "value": ch})]
        http("POST", self.session + "/actions",
             {"actions": [{"type": "key", "id": "keyboard", "actions": acts}]})

    def wait(self, condition, timeout=120, what=""):
        t0 = time.time()
        while time.time() - t0 < timeout:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise SystemExit(f"timed out waiting for {what} (the page's error line: "
                         f"{self.text('#error')!r})")

    def shot(self, path):
        data = http("GET", self.session + "/screenshot")["value"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        try:
            http("DELETE", self.session, timeout=10)
        finally:
            self.proc.terminate()


def gold_choice(prompt, a, b):
    """The key a learner who judges like the gold scorer presses: the better answer by
    gold, or a tie."""
    task = world.task_of_prompt(prompt)
    ga, gb = (world.gold(task, t.removesuffix("  (no end)"), not t.endswith("(no end)"))
              for t in (a, b))
    return "a" if ga > gb else "b" if gb > ga else "t"


def main(cfg):
    shots = Path(cfg.shots)
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    labels = Path(tempfile.mkdtemp()) / "labels.jsonl"
    browser = Browser(cfg, tempfile.mkdtemp())  # started first: its own start is not counted
    t0 = time.time()
    server = subprocess.Popen([sys.executable, str(ROOT / "playground.py"), f"--out={cfg.out}",
                               f"--data_dir={cfg.data_dir}", f"--port={port}",
                               f"--labels={labels}"], stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    summary = {}
    try:
        server.stdout.readline()  # "playground: http://..." once it listens
        browser.go(url + "/")
        browser.wait(lambda: (browser.text("#pair-prompt") or "…") != "…", what="the first pair")
        summary["first_page_s"] = round(time.time() - t0, 2)
        print(f"first page with a pair shown {summary['first_page_s']}s after the command")
        browser.shot(shots / "1-label.png")

        # label, reading each pair off the page
        choices = []
        for i in range(cfg.labels):
            prompt, a, b = (browser.text(x) for x in ("#pair-prompt", "#pair-a", "#pair-b"))
            key = gold_choice(prompt, a, b)
            choices.append(key)
            before = browser.text("#counts")
            browser.keys(key)
            browser.wait(lambda: browser.text("#counts") != before, what="the label",
                         timeout=20)
        browser.shot(shots / "1-label-verdict.png")
        n = sum(1 for _ in open(labels))
        summary["labels_written"] = n
        print(f"labelled {cfg.labels} pairs by keyboard ({choices.count('a')} A, "
              f"{choices.count('b')} B, {choices.count('t')} ties); {n} lines in {labels}")

        # train the reward model
        browser.keys("2" + ("i" if cfg.raters else "") + "r")
        state = browser.wait(lambda: (lambda s: s["reward_model"] and not s["job"]["running"]
                                      and s)(http("GET", url + "/api/state")),
                             what="the reward model", timeout=300)
        rm = state["reward_model"]
        summary["reward_model"] = {k: v for k, v in rm.items() if k != "scored"}
        print(f"reward model: {rm['labels']} labels + {rm['rater_rankings']} rater rankings, "
              f"{rm['steps']} steps in {rm['seconds']}s; held-out raters' pairs "
              f"{rm['val_accuracy']:.1%} (Bayes {rm['val_bayes']:.1%}), own labels "
              f"{rm['mine_accuracy']}")
        time.sleep(1.6)  # the page's next poll
        browser.shot(shots / "2-reward.png")

        # PPO through the page, measuring the server's answer time meanwhile
        browser.keys("3")
        for _ in range(cfg.steps // 10):
            browser.keys("m")
            time.sleep(0.3)
            latencies = []
            while True:
                t = time.time()
                s = http("GET", url + "/api/state")
                latencies.append(time.time() - t)
                if not s["job"]["running"]:
                    break
                time.sleep(0.2)
        hist = s["history"]
        summary["ppo_step_s"] = statistics.median(p["seconds"] for p in hist)
        summary["state_latency_ms"] = dict(median=round(1000 * statistics.median(latencies), 1),
                                           max=round(1000 * max(latencies), 1),
                                           n=len(latencies))
        print(f"{len(hist)} PPO steps, median {summary['ppo_step_s']}s a step; /api/state "
              f"answered in {summary['state_latency_ms']} ms meanwhile")
        time.sleep(1.6)
        browser.shot(shots / "3-ppo.png")

        # compare
        browser.keys("4/")
        browser.keys("What is 17 + 25?\n")
        browser.wait(lambda: "policy" in (browser.text("#compare-result") or ""),
                     what="the compare table")
        summary["compare"] = browser.text("#compare-result")
        browser.shot(shots / "4-compare.png")
        print("compare:\n" + summary["compare"])

        if cfg.hack_steps:  # β = 0: nothing holds the policy near SFT
            http("POST", url + "/api/settings", {"beta": 0})
            start = len(hist)
            for done in range(0, cfg.hack_steps, 10):
                http("POST", url + "/api/step", {"steps": min(10, cfg.hack_steps - done)})
                browser.wait(lambda: not http("GET", url + "/api/state")["job"]["running"],
                             timeout=600, what="the PPO steps")
            s = http("GET", url + "/api/state")
            hist = s["history"]
            summary["hack"] = [{k: p[k] for k in ("step", "beta", "reward", "gold", "kl",
                                                  "preamble", "length")}
                               for p in hist if p["step"] == start or p["step"] % 10 == 0]
            browser.keys("\ue00c3")  # Escape leaves the compare box, 3 shows PPO
            time.sleep(1.6)
            browser.shot(shots / "3-ppo-beta0.png")
            for p in summary["hack"]:
                print(f"  step {p['step']:3d}  β {p['beta']:.2f}  reward {p['reward']:+.2f}  "
                      f"gold {p['gold']:+.2f}  KL {p['kl']:6.2f}  preamble {p['preamble']:.0%}  "
                      f"words {p['length']:.1f}")
            summary["samples"] = s["samples"]
    finally:
        browser.close()
        server.send_signal(2)  # Ctrl-C
        out, _ = server.communicate(timeout=60)
        summary["server_exit"] = server.returncode
        summary["server_said"] = out.strip().splitlines()[-1:]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
