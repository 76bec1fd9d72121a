"""What the two papers state about their CIFAR-10 experiments, and where each statement comes from.

The published ACC / ASR values of ANP Table 1 and PBE Table 1 are *not* filled in here: no copy of
the papers' tables was readable where this was written, and a value typed from memory would be a
number passed off as the paper's. :func:`published` therefore returns only what a user supplies
(``--paper-numbers FILE.json``, format in :func:`load_published`); the reproduction table shows
"n/a" for every value nobody has supplied.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..validation import InputError

# The papers' settings, with their sources (the paper's text, else the authors' released code).
SETTINGS = {
    "anp": {
        "paper": "Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021 "
                 "(arXiv 2110.14430), Table 1: CIFAR-10, ResNet-18, mean of 5 runs",
        "stated": ["the backdoored model is trained on 90 % of the training set; defenses use the remaining 10 %",
                   "every defense gets the same 1 % of clean training data (500 images)",
                   "masks: SGD, eps 0.4, alpha 0.2, batch 128, constant lr 0.2, momentum 0.9, 2000 iterations"],
        "code": "csdongxian/ANP_backdoor: poison rate 5 %, target 0, BadNets 3x3 checkerboard bottom-right, "
                "Blend alpha 0.2; subjects trained 200 epochs (SGD lr 0.1, steps at 100 and 150)",
    },
    "pbe": {
        "paper": "Mu et al., Progressive Backdoor Erasing via Connecting Backdoor and Adversarial Attacks, CVPR 2023, "
                 "Table 1: CIFAR-10 (AFT: with a clean extra set; PBE: without clean data)",
        "stated": ["evaluated against 5 attacks; erases backdoors even without a clean extra set"],
        "code": "Syyabb/BPE: PreAct-ResNet-18, poison rate 10 %, target 0, PGD eps 6/255 with 7 steps, SGD lr 1e-3 "
                "batch 128; AFT 20 epochs (adversarial in the first 3); PBE 4 rounds on 5 % (random), then the "
                "top 20 / 50 / 70 % ranked by output similarity",
    },
}

# The columns a paper's row may fill: per method, (ACC, ASR) in percent.
METHODS = {"anp": ("before", "anp"), "pbe": ("before", "aft", "pbe")}


def load_published(path: str | Path, defense: str) -> dict[str, dict[str, list[float | None]]]:
    """A user's transcription of a paper's table: JSON ``{"<attack>": {"<method>": [ACC, ASR]}}``
    with ACC and ASR in percent, methods ``before`` and ``anp`` (ANP) or ``before``, ``aft``
    (clean extra set) and ``pbe`` (no clean data) (PBE). Values may be null."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"--paper-numbers {path}: not a readable JSON file ({err})") from None
    allowed = METHODS[defense]
    if not isinstance(table, dict):
        raise InputError(f"--paper-numbers {path}: expected an object {{attack: {{method: [ACC, ASR]}}}}")
    for attack, row in table.items():
        if not isinstance(row, dict):
            raise InputError(f"--paper-numbers {path}: {attack!r} must map methods to [ACC, ASR]")
        for method, pair in row.items():
            if method not in allowed:
                raise InputError(f"--paper-numbers {path}: unknown method {method!r} for {defense}; "
                                 f"use {', '.join(allowed)}")
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(v is None or isinstance(v, (int, float)) for v in pair)):
                raise InputError(f"--paper-numbers {path}: {attack}.{method} must be [ACC, ASR] in percent "
                                 f"(numbers or null), got {pair!r}")
    return table
