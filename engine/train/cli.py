"""`llamba mtp-train`: argument parsing; the work is in llamba.train.trainer (imports PyTorch)."""
from __future__ import annotations

from llamba.errors import LlambaError


def add_parser(sub, add_model_args):
    p = sub.add_parser("mtp-train", help="train a sidecar MTP head for a model on the CPU (needs llamba[train])",
                       description="Self-distillation: the model generates continuations of built-in seed prompts "
                                   "(and --data text), and a one-block MTP head learns to predict the token after "
                                   "next from the model's hidden state and the next token.")
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="HEAD.gguf", help="head file to write")
    p.add_argument("--minutes", type=float, default=20.0, help="time budget for the whole run (default 20)")
    p.add_argument("--data", default=None, metavar="FILE", help="extra training text (UTF-8)")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="K",
                   help="draft over the K most frequent tokens of the training data only (0: full vocabulary)")
    p.add_argument("--gen-tokens", type=int, default=0,
                   help="tokens to generate for training (default: about a third of the time budget's worth)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUTPUT.ckpt); resumed when present")
    p.add_argument("--f32", action="store_true", help="write F32 weights instead of Q8_0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=32, help="teacher top-k logits kept per position (default 32)")
    p.add_argument("--reg-weight", type=float, default=0.5,
                   help="weight of EAGLE's feature loss: the head's post-norm hidden regressed onto the trunk's "
                        "hidden at the same position (relative squared error; 0: off; default 0.5)")
    p.add_argument("--chain-weight", type=float, default=0.0,
                   help="weight of a second pass per step in which each row gets the head's own hidden of the row "
                        "before instead of the trunk's (what a chained draft at position 2+ sees; doubles the cost "
                        "of a step; 0: off, the default)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--data-frac", type=float, default=0.45,
                   help="share of the budget spent making data (default 0.45)")
    p.add_argument("--n-parallel", type=int, default=16, help="sequences generated at once (default 16)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what --minutes counts: wall time, or this process's CPU time divided by --threads "
                        "(a budget that means the same on a machine shared with other work)")
    return p


def main(a) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise LlambaError("mtp-train needs PyTorch: pip install 'llamba[train]'") from None
    from llamba.train.trainer import train_main
    return train_main(a)
