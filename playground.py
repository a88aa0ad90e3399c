"""The RLHF playground: a page in your browser where you are the labeler. You pick the
better of two answers of the SFT model, train a reward model on your picks, run PPO
against it a step at a time and watch the policy change, all for real, on the CPU,
with the embedded world's gold scorer shown beside the reward model's score.

    python playground.py                       # http://127.0.0.1:8000, over out/ and data/world
    python playground.py --port=8080
    python playground.py --out=out_quick --data_dir=data/world_quick
    python reward.py --prefs=prefs,prefs_sft,prefs_playground   # your labels, in the full stage

It needs data_dir (python data/prepare.py), out/pretrain and out/sft (python pipeline.py
makes them; so do the stages up to sft.py). The page has four views, keys 1-4:

  1 Label    a prompt and two answers sampled from the SFT model, shown in a random
             order; keys A, B, T (tie), S (skip). Each label is appended to
             data_dir/prefs_playground_train.jsonl and flushed to the disk before the
             page hears back: A/B labels as rankings in the format reward.py reads,
             ties and skips as lines it leaves out. Then the simulated raters' verdict
             and the gold scorer's are shown (V hides them).
  2 Reward   R trains a reward model (a Bradley-Terry head on the SFT trunk) on your
             labels, and with I also on the simulated raters' rankings; it then scores
             a fixed set of answers (good, wordy, with a preamble, wrong) beside gold.
  3 PPO      N runs one PPO iteration, M ten, X cancels, Z puts the policy back to SFT;
             β can be changed between runs. Curves: reward-model score and gold score,
             KL to SFT, answer length, preamble rate; a few current answers. With β = 0
             the policy learns what the reward model likes, not what gold likes.
  4 Compare  one prompt answered greedily by the base, SFT and current policy models,
             with gold (when the prompt is one of the world's questions) and reward.

Training runs in a background thread, one job at a time, with progress and cancel; the
page polls /api/state, so a second tab sees the same state. The server speaks JSON on
/api/...; a bad request gets a status and {"error": one line}. Ctrl-C stops it: the job
is cancelled at its next step and every label is already on the disk. The reward model
and policy live in memory only: a restart keeps the labels, not the training.
"""

import copy
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import ClassVar

import torch

import checkpoint
import distributed
import optim
import ppo
import records
from batch import reward_scores, sample_responses
from cli import UserError, parse_config, ranges, user_errors
from data import world
from data.tokenizer import decode_response, encode_prompt
from model import ScalarGPT
from records import load_rankings, load_raters, prompt_room, read_jsonl, world_tokenizer
from reward import bradley_terry_loss, collate, evaluate
from reward_model import RewardMember, RewardModel, member_scores

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playground.html")


@dataclass
class Config:
    data_dir: str = "data/world"     # the world: prompts, tokenizer, the raters' rankings
    out: str = "out"                 # reads out/pretrain and out/sft
    labels: str = ""                 # your labels ("": data_dir/prefs_playground_train.jsonl)
    host: str = "127.0.0.1"          # the address the server listens on (this machine only)
    port: int = 8000                 # its port (0: any free port)
    max_new_tokens: int = 32         # answer length limit everywhere on the page
    raters: int = 512                # the simulated raters' rankings added when the page asks
    rm_steps: int = 60               # reward model: optimizer steps
    rm_batch: int = 16               # reward model: rankings per step
    rm_lr: float = 3e-4              # reward model: peak learning rate (warmup, cosine decay)
    ppo_batch: int = 32              # PPO: rollouts per iteration
    ppo_minibatch: int = 16          # PPO: rollouts per gradient step
    ppo_epochs: int = 4              # PPO: passes over each batch of rollouts
    ppo_lr: float = 1e-4             # PPO: policy learning rate (constant)
    beta: float = 0.2                # PPO: KL penalty β at start (ppo.py's); the page changes it
    seed: int = 1337                 # pairs, training order and rollouts follow from it
    device: str = "cpu"              # cpu, cuda or mps (the page is made for a CPU)

    RANGES: ClassVar = ranges(
        at_least_1="max_new_tokens rm_steps rm_batch ppo_batch ppo_minibatch ppo_epochs",
        non_negative="port raters beta", positive="rm_lr ppo_lr")


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one line for the page."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# --- pure functions: a label's record and verdict, the fixed answers the reward model scores --


def label_record(pair, choice):
    """The line appended for a label: a ranking in the format reward.py reads (best
    first) for A or B, and the same record without a ranking for a tie or a skip.
    pair["left"] is the index of the response shown as A."""
    rec = {k: pair[k] for k in ("task", "family", "prompt")}
    rec["responses"] = [dict(r) for r in pair["responses"]]
    if choice in ("A", "B"):
        winner = pair["left"] if choice == "A" else 1 - pair["left"]
        rec["ranking"] = [winner, 1 - winner]
    return {**rec, "choice": choice, "left": pair["left"], "source": "playground"}


def verdict(pair, choice, raters):
    """What the simulated raters and the gold scorer say of the pair, as the page shows it:
    the raters' probability of preferring A, each answer's gold score, and which answer
    each prefers ("A", "B" or "tie")."""
    task = world.Task.from_dict(pair["task"])
    a, b = (pair["responses"][pair["left"]], pair["responses"][1 - pair["left"]])
    gold = [world.gold(task, r["text"], r["ended"]) for r in (a, b)]
    util = [world.rater_utility(task, r["text"], r["ended"], raters) for r in (a, b)]
    p_a = world.pair_probability(*util)
    return dict(choice=choice, raters_p_a=round(p_a, 3), gold_a=round(gold[0], 2),
                gold_b=round(gold[1], 2), raters_prefer="A" if p_a > 0.5 else "B" if p_a < 0.5
                else "tie", gold_prefers="A" if gold[0] > gold[1] else "B" if gold[1] > gold[0]
                else "tie")


SHOWCASE_STYLES = ("ideal", "verbose", "preamble", "hedged", "wrong", "preamble_wrong")


def showcase(tasks, seed):
    """A fixed set of answers in several styles to a few prompts: (task, style, text,
    ended, gold) rows, the same on every call with the same seed."""
    rng = random.Random(seed)
    rows = []
    for task in tasks:
        for style in SHOWCASE_STYLES:
            text, ended = world.respond(rng, task, style)
            rows.append(dict(task=task, prompt=task.prompt, style=style, text=text, ended=ended,
                             gold=round(world.gold(task, text, ended), 2)))
    return rows


# --- the playground's state, and the two training loops -------------------------------------


class Job:
    """One background job: what it is, its progress, and a flag asking it to stop."""

    def __init__(self, kind, total):
        self.kind, self.total, self.done, self.message = kind, total, 0, "starting"
        self.cancel, self.error, self.running = threading.Event(), None, True
        self.started = time.time()

    def public(self):
        return dict(kind=self.kind, total=self.total, done=self.done, message=self.message,
                    running=self.running, error=self.error, cancelled=self.cancel.is_set(),
                    seconds=round(time.time() - self.started, 1))


class Playground:
    """Everything the page shows, shared by every request (and so by every tab). `lock`
    guards the small state the page reads; the models a job trains are read by requests
    only through copies made when a step ends."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.run = distributed.setup(cfg.seed, cfg.device)
        self.enc = world_tokenizer(cfg.data_dir)
        enc = self.enc
        self.tok = SimpleNamespace(end=enc.encode_single_token("<|end|>"),
                                   pad=enc.encode_single_token("<|endoftext|>"))
        load = lambda stage, cmd: checkpoint.load_model(  # noqa: E731
            os.path.join(cfg.out, stage, "ckpt.pt"), cmd, enc, device=self.run.device)[0]
        self.base = load("pretrain", "python pretrain.py").requires_grad_(False)
        self.sft = load("sft", "python sft.py").requires_grad_(False)
        prompt_room(self.sft.config.block_size, cfg.max_new_tokens)  # refused if none
        self.raters = (load_raters(cfg.data_dir)
                       if os.path.exists(os.path.join(cfg.data_dir, "meta.json"))
                       else world.RaterConfig())
        recs = read_jsonl(os.path.join(cfg.data_dir, "prompts_train.jsonl"),
                          {"prompt": str, "task": dict})
        self.prompts = [(r["prompt"], world.Task.from_dict(r["task"])) for r in recs]
        # for the compare view: one held-out question of each family (eval.py's prompts)
        first = {}
        for r in read_jsonl(os.path.join(cfg.data_dir, "eval.jsonl"), {"prompt": str,
                                                                       "family": str}):
            first.setdefault(r["family"], r["prompt"])
        self.suggestions = list(first.values())
        self.labels_path = cfg.labels or os.path.join(cfg.data_dir, "prefs_playground_train.jsonl")
        folder = os.path.dirname(os.path.abspath(self.labels_path))
        try:  # where the labels go must take them: found now, not at the first click
            os.makedirs(folder, exist_ok=True)
            why = None if os.access(folder, os.W_OK) else "not writable"
        except OSError as e:
            why = e.strerror or str(e)
        if why:
            raise UserError(f"--labels={self.labels_path}: cannot write in {folder} ({why})")
        labels, note = records.read_log(self.labels_path, lambda r: (r["prompt"], r["choice"]))
        if note:
            print(note)
        self.counts = {c: sum(r["choice"] == c for r in labels) for c in ("A", "B", "tie", "skip")}
        self.lock, self.file_lock = threading.Lock(), threading.Lock()
        self.rng = random.Random(f"{cfg.seed}:{sum(self.counts.values())}")
        self.pair_id, self.pair, self.last_verdict = 0, None, None
        self.version = 0  # counts the changes to what the page shows; a tab keeps the newest
        self.job, self.thread = None, None
        self.rm, self.rm_info = None, None
        self.beta = cfg.beta
        self.reset_policy()
        # the reward model's exhibit: a question of arithmetic (whose wrong answers it can
        # hardly tell from right ones) and one of facts
        firsts = {}
        for _, t in self.prompts:
            firsts.setdefault(t.family, t)
        self.cases = showcase([firsts[f] for f in ("arithmetic", "facts") if f in firsts]
                              or [self.prompts[0][1]], cfg.seed)

    # -- labelling --------------------------------------------------------------------------

    def draw_pair(self):
        """Two different answers of the SFT model to a random training prompt (at most
        8 tries), and a coin for which is shown as A; not shown yet."""
        for attempt in range(8):
            prompt, task = self.rng.choice(self.prompts)
            seed = self.rng.randrange(2 ** 31)
            answers = [decode_response(self.enc, r) for _, r in sample_responses(
                self.sft, self.enc, [prompt, prompt], self.cfg.max_new_tokens, 1.0, seed,
                self.run.device)]
            if answers[0][0] != answers[1][0] or attempt == 7:
                break
        responses = [dict(text=t, ended=e, style="sft_sample",
                          gold=round(world.gold(task, t, e), 4),
                          utility=round(world.rater_utility(task, t, e, self.raters), 4))
                     for t, e in answers]
        return dict(task=task.to_dict(), family=task.family, prompt=prompt,
                    responses=responses, left=self.rng.randrange(2))

    def show_pair(self, pair):
        """Called with self.lock held: the pair every tab shows from now on."""
        self.pair_id += 1
        self.version += 1
        self.pair = dict(pair, id=self.pair_id)

    def label(self, pair_id, choice):
        """Append the label to the file (flushed and synced before this returns), show
        the verdict, draw the next pair. A label for a pair that is no longer shown
        (another tab answered it) is refused."""
        if choice not in ("A", "B", "tie", "skip"):
            raise ApiError(400, f"choice {choice!r}: expected A, B, tie or skip")
        with self.file_lock:
            pair = self.pair
            if pair is None or pair_id != pair["id"]:
                raise ApiError(409, f"pair {pair_id} is no longer shown (labelled in another "
                                    f"tab?); here is the current one")
            try:
                with open(self.labels_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(label_record(pair, choice)) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # a full disk: the label is not kept, the page says why
                raise ApiError(507, f"could not write {self.labels_path}: {e.strerror or e}") \
                    from None
            following = self.draw_pair()
            with self.lock:  # the count, the verdict and the next pair change together
                self.counts[choice] += 1
                self.last_verdict = dict(verdict(pair, choice, self.raters), pair=pair_id,
                                         prompt=pair["prompt"],
                                         a=pair["responses"][pair["left"]]["text"],
                                         b=pair["responses"][1 - pair["left"]]["text"])
                self.show_pair(following)

    # -- jobs -------------------------------------------------------------------------------

    def start(self, kind, total, work):
        """Run work(job) in a background thread, unless a job is running."""
        with self.lock:
            if self.job is not None and self.job.running:
                raise ApiError(409, f"a {self.job.kind} job is running ({self.job.done}/"
                                    f"{self.job.total}); wait for it or cancel it")
            job = self.job = Job(kind, total)

        def target():
            try:
                work(job)
                job.message = "cancelled" if job.cancel.is_set() else "done"
            except Exception as e:  # shown on the page in one line; the server goes on
                job.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"playground: the {kind} job failed: {job.error}", file=sys.stderr)
            finally:
                job.running = False

        self.thread = threading.Thread(target=target, name=kind, daemon=True)
        self.thread.start()
        return job

    # -- the reward model: Bradley-Terry on the labels, the loop in sight ------------------------

    def train_reward_model(self, job, with_raters):
        cfg, dev, block = self.cfg, self.run.device, self.sft.config.block_size
        mine = (load_rankings(self.labels_path, self.enc, block)
                if os.path.exists(self.labels_path) and self.counts["A"] + self.counts["B"]
                else [])
        theirs = []
        if with_raters:
            theirs = load_rankings(os.path.join(cfg.data_dir, "prefs_train.jsonl"), self.enc,
                                   block)[:cfg.raters]
        rankings = mine + theirs
        rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        member = RewardMember.from_lm(self.sft).to(dev).train()  # the plain Bradley-Terry head
        member.requires_grad_(True)
        opt = member.configure_optimizers(0.1, cfg.rm_lr, (0.9, 0.95), self.run.device_type)
        for step in range(cfg.rm_steps):
            if job.cancel.is_set():
                return
            optim.set_lr(opt, optim.lr_at(step, cfg.rm_lr, cfg.rm_steps // 10, cfg.rm_steps))
            chunk = [rankings[rng.randrange(len(rankings))] for _ in range(cfg.rm_batch)]
            batch, chosen, rejected = collate(chunk, self.tok.pad, dev)
            r = member_scores(member, batch, "last")
            loss, right = bradley_terry_loss(r[chosen], r[rejected])
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(member.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            job.done = step + 1
            job.message = f"step {step + 1}: loss {loss.mean().item():.3f}, batch accuracy " \
                          f"{right.mean().item():.0%}"
        member.eval().requires_grad_(False)
        # normalised as reward.py does: mean 0 and std 1 on SFT answers to training prompts
        job.message = "normalising on SFT answers"
        norm_pairs = sample_responses(self.sft, self.enc, [p for p, _ in self.prompts[:64]],
                                      cfg.max_new_tokens, 1.0, cfg.seed, dev)
        raw = reward_scores(lambda b: member_scores(member, b, "last"), norm_pairs,
                            self.tok.pad, dev)
        std = raw.std().clamp(min=1e-6).item()
        rm = RewardModel([member], [[1 / std, -raw.mean().item() / std]]).to(dev).eval()
        job.message = "measuring"
        val = load_rankings(os.path.join(cfg.data_dir, "prefs_val.jsonl"), self.enc, block)[:128]
        held = evaluate(rm, val, self.tok.pad, dev)
        info = dict(labels=len(mine), rater_rankings=len(theirs), steps=cfg.rm_steps,
                    seconds=round(time.time() - job.started, 1),
                    val_accuracy=round(held["accuracy"], 3),
                    val_bayes=round(held.get("bayes_optimal", float("nan")), 3),
                    mine_accuracy=(round(evaluate(rm, mine, self.tok.pad, dev)["accuracy"], 3)
                                   if mine else None),
                    scored=self.score_cases(rm))
        with self.lock:
            self.rm, self.rm_info = rm, info
            self.version += 1
        self.reset_policy()  # a new reward model: PPO starts again from SFT

    def score_cases(self, rm):
        pairs = [(encode_prompt(self.enc, c["prompt"]),
                  self.enc.encode_ordinary(c["text"]) + ([self.tok.end] if c["ended"] else []))
                 for c in self.cases]
        scores = reward_scores(rm, pairs, self.tok.pad, self.run.device).tolist()
        return [dict({k: v for k, v in c.items() if k != "task"}, reward=round(s, 2))
                for c, s in zip(self.cases, scores)]

    # -- PPO: the policy, its value model and one iteration at a time ---------------------------

    def reset_policy(self):
        """The policy back to the SFT model; the value model from the reward model's trunk
        and head (as ppo.py starts it), or from SFT with a zero head before there is one."""
        policy = copy.deepcopy(self.sft).requires_grad_(True).eval()  # eval: dropout off
        value = (ScalarGPT.from_lm(self.sft) if self.rm is None else
                 ScalarGPT(self.sft.config).to(self.run.device))
        if self.rm is not None:
            value.load_state_dict(self.rm.members[0].trunk_and_head())
        value.requires_grad_(True).eval()
        with self.lock:
            self.policy, self.value = policy, value
            self.shown_policy = copy.deepcopy(policy).requires_grad_(False)
            self.opt_policy = self.opt_value = None  # made by the first step
            self.history, self.samples, self.iteration = [], [], 0
            self.version += 1

    def ppo_steps(self, job, n):
        cfg, dev = self.cfg, self.run.device
        pcfg = ppo.Config(batch_size=cfg.ppo_batch, minibatch_size=cfg.ppo_minibatch,
                          ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.max_new_tokens,
                          learning_rate=cfg.ppo_lr, kl_coef=self.beta)
        rm = self.rm
        if self.opt_policy is None:
            self.opt_policy = self.policy.configure_optimizers(0.0, cfg.ppo_lr, (0.9, 0.95),
                                                               self.run.device_type)
            self.opt_value = self.value.configure_optimizers(0.0, pcfg.value_lr, (0.9, 0.95),
                                                             self.run.device_type)
        for k in range(n):
            if job.cancel.is_set():
                return
            t0 = time.time()
            it = self.iteration
            g = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + it)
            pick = random.Random(f"{cfg.seed}:{it}").sample(range(len(self.prompts)),
                                                            cfg.ppo_batch)
            prompts = [encode_prompt(self.enc, self.prompts[i][0]) for i in pick]

            def score_fn(prompts, responses):
                return reward_scores(rm, list(zip(prompts, responses)), self.tok.pad, dev)

            # steps 1-4 of ppo.py: sample, score, per-token KL penalty, values and GAE
            with self.run.autocast:  # as the update (bf16 on CUDA), so the first ratio is 1
                batch = ppo.rollout(self.policy, self.sft, self.value, score_fn, prompts,
                                    self.beta, pcfg, self.tok, g, dev)
            batch["advantages"] = ppo.whiten(batch["advantages"], batch["mask"])
            # step 5: the clipped-ratio updates of policy and value model
            stats = ppo.ppo_update(self.policy, self.value, self.opt_policy, self.opt_value, batch,
                                   pcfg, cfg.ppo_lr, pcfg.value_lr, g, self.run)
            # what the page shows: the proxy (reward model) beside the gold scorer
            answers = [decode_response(self.enc, r) for r in batch["responses"]]
            grades = [world.grade(self.prompts[i][1], t, e) for i, (t, e) in zip(pick, answers)]
            mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
            point = dict(step=it + 1, beta=self.beta,
                         reward=mean(batch["scores"].tolist()),
                         gold=mean([x["gold"] for x in grades]),
                         kl=mean(batch["kl"].sum(1).tolist()),
                         length=mean([x["words"] for x in grades]),
                         preamble=mean([float(x["preamble"]) for x in grades]),
                         correct=mean([float(x["correct"]) for x in grades]),
                         clipfrac=round(stats["policy/clipfrac"], 4),
                         seconds=round(time.time() - t0, 2))
            samples = [dict(prompt=self.prompts[i][0], answer=t, ended=e,
                            reward=round(s, 2), gold=round(x["gold"], 2))
                       for i, (t, e), s, x in list(zip(pick, answers, batch["scores"].tolist(),
                                                       grades))[:4]]
            shown = copy.deepcopy(self.policy).requires_grad_(False)
            with self.lock:
                self.iteration += 1
                self.history.append(point)
                self.samples, self.shown_policy = samples, shown
                self.version += 1
            job.done = k + 1
            job.message = (f"iteration {it + 1}: reward {point['reward']:+.2f}, gold "
                           f"{point['gold']:+.2f}, KL {point['kl']:.2f}")

    # -- compare ------------------------------------------------------------------------------

    def compare(self, prompt):
        """Greedy answers of base, SFT and the current policy to one prompt, with gold (when
        the prompt is one of the world's questions) and the reward model's score."""
        prompt = " ".join(prompt.split())
        if not prompt:
            raise ApiError(400, "the prompt is empty: type a question")
        ids = encode_prompt(self.enc, prompt)
        if len(ids) + self.cfg.max_new_tokens > self.sft.config.block_size:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; at most "
                                f"{self.sft.config.block_size - self.cfg.max_new_tokens} fit")
        task, rm = world.task_of_prompt(prompt), self.rm
        with self.lock:
            policy, step = self.shown_policy, self.iteration
        rows = []
        for name, model in (("base", self.base), ("SFT", self.sft),
                            (f"policy (PPO step {step})", policy)):
            _, resp = sample_responses(model, self.enc, [ids], self.cfg.max_new_tokens, 0.0, 0,
                                       self.run.device, stop=self.tok.end)[0]
            text, ended = decode_response(self.enc, resp)
            g = world.grade(task, text, ended) if task else None
            rows.append(dict(model=name, answer=text, ended=ended,
                             gold=round(g["gold"], 2) if g else None,
                             correct=g["correct"] if g else None, tokens=(ids, resp)))
        if rm is not None:
            for row, s in zip(rows, reward_scores(rm, [r["tokens"] for r in rows], self.tok.pad,
                                                  self.run.device).tolist()):
                row["reward"] = round(s, 2)
        for row in rows:
            del row["tokens"]
        return dict(prompt=prompt, task=task.kind if task else None,
                    ideal=world.ideal_answer(task) if task else None, rows=rows)

    # -- what every tab reads ---------------------------------------------------------------

    def state(self):
        if self.pair is None:
            first = self.draw_pair()
            with self.lock:
                if self.pair is None:
                    self.show_pair(first)
        with self.lock:
            p = self.pair
            shown = [p["responses"][p["left"]], p["responses"][1 - p["left"]]]
            return dict(
                version=self.version, pair=dict(id=p["id"], prompt=p["prompt"],
                          a=dict(text=shown[0]["text"], ended=shown[0]["ended"]),
                          b=dict(text=shown[1]["text"], ended=shown[1]["ended"])),
                counts=self.counts, labels_path=self.labels_path, verdict=self.last_verdict,
                job=self.job.public() if self.job else None,
                reward_model=self.rm_info, beta=self.beta, iteration=self.iteration,
                history=self.history, samples=self.samples,
                suggestions=self.suggestions,
                settings=dict(raters=self.cfg.raters, rm_steps=self.cfg.rm_steps,
                              ppo_batch=self.cfg.ppo_batch, ppo_lr=self.cfg.ppo_lr))


# --- the HTTP server ---------------------------------------------------------------------------


def field(body, name, typ, default=None):
    """body[name], checked to be of type typ (a bool is not a number)."""
    value = body.get(name, default)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        what = {int: "an integer", str: "a string", bool: "true or false"}.get(typ, "a number")
        raise ApiError(400, f"field {name!r} should be {what}")
    return value


def api(pg, method, path, body):
    """The API, one route a line: returns the JSON answer or raises ApiError."""
    if (method, path) == ("GET", "/api/state"):
        return pg.state()
    if method == "GET":
        raise ApiError(404, f"no such page: {path}")
    if path == "/api/label":
        pg.label(field(body, "pair", int), field(body, "choice", str))
        return pg.state()
    if path == "/api/train":
        with_raters = field(body, "raters", bool, False)
        if (not with_raters or not pg.cfg.raters) and pg.counts["A"] + pg.counts["B"] < 2:
            raise ApiError(400, "label at least 2 pairs with A or B first, or include the "
                                "simulated raters' labels" + (" (--raters=0 leaves none)"
                                                              if with_raters else ""))
        pg.start("reward model", pg.cfg.rm_steps,
                 lambda job: pg.train_reward_model(job, with_raters))
        return pg.state()
    if path == "/api/step":
        n = field(body, "steps", int, 1)
        if not 1 <= n <= 100:
            raise ApiError(400, f"steps={n}: expected 1 to 100")
        if pg.rm is None:
            raise ApiError(409, "train a reward model first (view 2)")
        if pg.cfg.ppo_batch > len(pg.prompts):
            raise ApiError(409, f"--ppo_batch={pg.cfg.ppo_batch} is more than the "
                                f"{len(pg.prompts)} training prompts; restart with a smaller one")
        pg.start("PPO", n, lambda job: pg.ppo_steps(job, n))
        return pg.state()
    if path == "/api/settings":
        beta = field(body, "beta", (int, float))
        if not 0 <= beta <= 10:
            raise ApiError(400, f"beta={beta}: expected a number from 0 to 10")
        with pg.lock:  # checked under the lock, so no job can start in between
            busy(pg)
            pg.beta = float(beta)
            pg.version += 1
        return pg.state()
    if path == "/api/reset":
        busy(pg)
        pg.reset_policy()
        return pg.state()
    if path == "/api/cancel":
        if pg.job is None or not pg.job.running:
            raise ApiError(409, "no job is running")
        pg.job.cancel.set()
        return pg.state()
    if path == "/api/compare":
        return pg.compare(field(body, "prompt", str))
    raise ApiError(404, f"no such route: POST {path}")


def busy(pg):
    if pg.job is not None and pg.job.running:
        raise ApiError(409, f"a {pg.job.kind} job is running: change settings between runs")


class Handler(BaseHTTPRequestHandler):
    pg: Playground = None  # set by serve()
    server_version = "minRLHF-playground"

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            with open(PAGE, "rb") as f:
                self.send(200, f.read(), "text/html; charset=utf-8")
        else:
            self.answer("GET", None)

    def do_POST(self):
        try:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}") if 0 <= n <= 1 << 20 else None
            if not isinstance(body, dict):
                raise ValueError
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read
            return self.send_json(400, {"error": "the request body should be a JSON object"})
        self.answer("POST", body)

    def answer(self, method, body):
        try:
            out = api(self.pg, method, self.path.split("?")[0], body or {})
            self.send_json(200, out)
        except ApiError as e:
            self.send_json(e.status, {"error": str(e)})
        except UserError as e:
            self.send_json(400, {"error": str(e)})
        except Exception as e:  # a bug: one line in the log and on the page, the server goes on
            print(f"playground: {method} {self.path} failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
            self.send_json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def send_json(self, status, obj):
        self.send(status, json.dumps(obj).encode(), "application/json")

    def send(self, status, data, ctype):
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the tab went away

    def log_message(self, fmt, *args):
        pass  # quiet: errors are logged in answer()


def serve(pg, host, port):
    """A threaded HTTP server bound to host:port over the playground (not yet serving)."""
    handler = type("BoundHandler", (Handler,), {"pg": pg})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise UserError(f"--host={host} --port={port}: cannot listen there ({e.strerror}); "
                        f"choose another --port") from None
    server.daemon_threads = True
    return server


def main(cfg):
    t0 = time.time()
    if cfg.port > 65535:
        raise UserError(f"--port={cfg.port}: a port is at most 65535 (0: any free port)")
    if cfg.ppo_batch % cfg.ppo_minibatch:  # as ppo.py: every gradient step on as many rollouts
        raise UserError(f"--ppo_minibatch={cfg.ppo_minibatch} must split "
                        f"--ppo_batch={cfg.ppo_batch} evenly")
    pg = Playground(cfg)
    server = serve(pg, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    print(f"playground: http://{host}:{port}/  (ready in {time.time() - t0:.1f}s; labels go "
          f"to {pg.labels_path}; Ctrl-C stops)", flush=True)
    # torch's optimizers import a good deal on first use: done now, not when a job starts
    warm = threading.Thread(target=lambda: torch.optim.AdamW([torch.zeros(1, requires_grad=True)]),
                            daemon=True)
    warm.start()

    def stop(signum, frame):
        raise KeyboardInterrupt
    # Ctrl-C and SIGTERM stop the server, even where the shell that started it ignores
    # SIGINT (a background job of a script does)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if pg.job is not None and pg.job.running:
            pg.job.cancel.set()  # a job stops at its next step
        server.server_close()
    busy = [t for t in (pg.thread, warm) if t is not None]
    for t in busy:
        t.join(timeout=30)
    n = sum(pg.counts.values())
    print(f"\nstopped; {n} label(s) in {pg.labels_path}", flush=True)
    if any(t.is_alive() for t in busy):
        # a thread still inside one long call (on a loaded machine): every label is on the
        # disk, so end now rather than let the interpreter's exit wait on it
        os._exit(0)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
