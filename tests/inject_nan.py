"""Run a script with NaNs put into its gradients at chosen optimizer steps, from outside
the library:

    python tests/inject_nan.py STEPS script.py [--flag=value ...]

Every stage clips its gradients with torch.nn.utils.clip_grad_norm_ once per optimizer
step (PPO: twice per minibatch, the policy then the value model), looking it up at call
time. This wraps it: on its k-th call in this process, counted from 0, for every k in the
comma-separated STEPS, it first puts a NaN into the first parameter gradient that is not
None, then clips as usual. The script then runs as `python script.py [flags]` would run
it (runpy, as __main__, with sys.argv and sys.path[0] set accordingly).
"""

import os
import runpy
import sys

import torch


def inject(steps):
    """Wrap torch.nn.utils.clip_grad_norm_ to put a NaN into a gradient on the calls
    numbered in `steps` (from 0)."""
    original = torch.nn.utils.clip_grad_norm_
    calls = [0]

    def clip_grad_norm_(parameters, *args, **kwargs):
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if calls[0] in steps:
            grad = next((p.grad for p in parameters if p.grad is not None), None)
            if grad is not None:
                grad[(0,) * grad.dim()] = float("nan")
        calls[0] += 1
        return original(parameters, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    steps = {int(x) for x in argv[0].split(",") if x.strip()}
    script = argv[1]
    inject(steps)
    sys.argv = [script, *argv[2:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
