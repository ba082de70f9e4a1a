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
    return p


def main(a) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise LlambaError("mtp-train needs PyTorch: pip install 'llamba[train]'") from None
    from llamba.train.trainer import train_main
    return train_main(a)
