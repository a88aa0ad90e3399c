"""What limits the reward model: the raters' Bradley-Terry model refitted on features.

The raters' utility (data/world.py) is a known function of an answer's correctness and
its style. Style can be read off the text; correctness has to come from what the trunk
knows. This script fits the raters' Bradley-Terry model by logistic regression on the
training rankings, with the exact style features the gold scorer computes (words,
preamble, hedge, restated question, format, repetition, ended) and one signal of
correctness at a time:

  style only         no correctness signal;
  trunk likelihood   the SFT model's probabilities of the answer's value, written in the
                     canonical sentence (sums over its tokens of log p, log p clamped at
                     -3, the clamped gap to the likeliest token, and p): what a reward
                     model that scores one answer at a time can read from its trunk;
  trunk belief       whether the answer's value is the SFT model's likeliest among the
                     values the ranking's answers give: a comparison across the answers,
                     which a reward of one answer cannot make;
  gold correctness   the truth, which recovers the Bayes-optimal accuracy.

Each fit's accuracy on the held-out rankings is the expected one over the raters' draws
(reward.evaluate), shown overall and per family beside the Bayes-optimal accuracy. A
reward model can beat a fit only by knowing more than its features; the gap between the
trunk rows and the gold row is what the trunk does not know.

    python bench/reward_ceiling.py                      # data/world and out/sft
    python bench/reward_ceiling.py --data_dir=D --sft=out/sft --prefs=prefs
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import checkpoint  # noqa: E402
import reward  # noqa: E402
from batch import collate  # noqa: E402
from cli import parse_config, user_errors  # noqa: E402
from data import world  # noqa: E402
from data.tokenizer import encode_prompt, encode_response  # noqa: E402
from model import token_logprobs  # noqa: E402
from records import load_preference_sets, world_tokenizer  # noqa: E402

STYLE = ["words", "preamble", "hedge", "restate", "format", "repetition", "ended"]
LIKELIHOOD = ["logp", "logp_clamped", "gap_clamped", "p"]
FITS = {"style only": STYLE, "trunk likelihood": STYLE + LIKELIHOOD,
        "trunk belief": STYLE + ["belief"], "gold correctness": STYLE + ["correct"]}


@dataclass
class Config:
    data_dir: str = "data/world"   # folder written by data/prepare.py
    sft: str = "out/sft"           # folder of the SFT checkpoint (the reward model's trunk)
    prefs: str = "prefs,prefs_sft"  # preference sets, as reward.py --prefs


@torch.no_grad()
def value_likelihoods(sft, enc, task, values, pad):
    """For each value: the LIKELIHOOD features of the canonical answer sentence with it."""
    p = encode_prompt(enc, task.prompt)
    b = collate([p + encode_response(enc, world.render(task, v), True) for v in values],
                [len(p)] * len(values), pad, "cpu")
    tokens, mask = b.tokens, b.mask
    logits = sft(tokens)[0]
    logp = token_logprobs(logits, tokens, mask)
    # log p(y) − max log p = logit(y) − max logit: the normaliser cancels, no second softmax
    shifted = logits[:, :-1].float()
    gap = shifted.gather(-1, tokens[:, 1:, None]).squeeze(-1) - shifted.max(-1).values
    rows = (torch.stack([logp, logp.clamp(min=-3), gap.clamp(min=-3), logp.exp()], -1)
            * mask[:, 1:, None])
    return dict(zip(values, rows.sum(1).tolist()))


def features(sft, enc, rankings, pad):
    """One row of features per response, and the pairs and raters' utilities."""
    rows, utility, pairs, family = [], [], [], []
    for rk in rankings:
        rec = rk["rec"]
        task = world.Task.from_dict(rec["task"])
        values = [world.extract_answer(task, r["text"]) for r in rec["responses"]]
        known = sorted({v for v in values if v is not None})
        lik = value_likelihoods(sft, enc, task, known, pad) if known else {}
        likeliest = max(known, key=lambda v: lik[v][0]) if known else None
        base = len(rows)
        for r, v in zip(rec["responses"], values):
            g = world.grade(task, r["text"], r["ended"])
            f = {k: float(g[k]) for k in STYLE if k != "ended"}
            f.update(ended=float(r["ended"]), correct=float(g["correct"]),
                     belief=float(v is not None and v == likeliest))
            # no answer to read: the likelihood of a value that is not there is taken as very low
            f.update(zip(LIKELIHOOD, lik[v] if v is not None else [-60.0, -12.0, -12.0, 0.0]))
            rows.append(f)
            utility.append(float(r["utility"]))
        pairs += [(base + c, base + j) for c, j in rk["pairs"]]
        family += [rec["family"]] * len(rk["pairs"])
    return rows, torch.tensor(utility, dtype=torch.float64), pairs, family


def matrix(rows, names):
    return torch.tensor([[r[n] for n in names] for r in rows], dtype=torch.float64)


def fit(sets, names):
    """Bradley-Terry weights on the named features: logistic regression on the
    differences of each (chosen, rejected) pair of the training rankings."""
    diffs = []
    for rows, _, pairs, _ in sets:
        X = matrix(rows, names)
        diffs.append(X[[c for c, _ in pairs]] - X[[j for _, j in pairs]])
    X = torch.cat(diffs)
    w = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -F.logsigmoid(X @ w).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def expected_accuracy(scores, utility, pairs, family):
    """Overall and per-family (expected accuracy, Bayes-optimal accuracy) over the raters' draws."""
    c, j = [a for a, _ in pairs], [b for _, b in pairs]
    expected, bayes = reward.against_raters(torch.sigmoid(utility[c] - utility[j]),
                                            scores[c] - scores[j])
    out = {"all": (expected.mean().item(), bayes.mean().item())}
    for f, x in reward.per_family(expected, bayes, family).items():
        out[f] = (x["expected_accuracy"], x["bayes_optimal"])
    return out


def main(args):
    enc = world_tokenizer(args.data_dir)
    sft, _ = checkpoint.load_model(os.path.join(args.sft, "ckpt.pt"), "python sft.py", enc)
    pad = enc.encode_single_token("<|endoftext|>")
    block = sft.config.block_size
    train = [features(sft, enc, rankings, pad)
             for rankings in load_preference_sets(args.data_dir, args.prefs, "train", enc,
                                                  block).values()]
    val = {name: features(sft, enc, rankings, pad)
           for name, rankings in load_preference_sets(args.data_dir, args.prefs, "val", enc,
                                                      block).items()}
    weights = {fit_name: fit(train, names)
               for fit_name, names in FITS.items()}  # one fit serves every set
    for name, (rows, utility, pairs, family) in val.items():
        print(f"{name}: {len(pairs)} held-out pairs; expected accuracy over the raters' draws "
              f"(Bayes-optimal)")
        for fit_name, names in FITS.items():
            res = expected_accuracy(matrix(rows, names) @ weights[fit_name], utility, pairs, family)
            per_family = ", ".join(f"{f} {e:.1%}" for f, (e, _) in res.items() if f != "all")
            print(f"  {fit_name:17s} {res['all'][0]:.1%} ({res['all'][1]:.1%})   {per_family}")
        bayes = expected_accuracy(utility, utility, pairs, family)
        print(f"  {'Bayes-optimal':17s} {bayes['all'][1]:.1%}            "
              + ", ".join(f"{f} {b:.1%}" for f, (_, b) in bayes.items() if f != "all"))


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
