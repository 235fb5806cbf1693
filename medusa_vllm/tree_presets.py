"""Named token trees, as readable lists of paths (Medusa "choices").

``default-63`` is ``mc_sim_7b_63`` from FasterDecoding/Medusa (medusa_choices.py), the tree of the
Medusa paper. The ``sparse-*`` trees are the best trees of their size under nominal per-rank head
accuracies (tree.tree_from_accuracies with NOMINAL_ACCURACIES below); heads trained by
``python -m training.train`` record their own calibrated tree in their config instead.
"""

# Per head (k = 0..3), per rank (r = 0..9): probability that the rank-r candidate is right.
# Shaped like the Vicuna-7B head accuracies reported in the Medusa paper (top-1 ≈ 0.6, 0.4,
# 0.3, 0.25), decaying over ranks.
NOMINAL_ACCURACIES = [
    [0.60, 0.12, 0.05, 0.03, 0.02, 0.015, 0.012, 0.01, 0.008, 0.006],
    [0.40, 0.10, 0.05, 0.03, 0.02, 0.015, 0.012, 0.01, 0.008, 0.006],
    [0.30, 0.09, 0.045, 0.03, 0.02, 0.015, 0.012, 0.01, 0.008, 0.006],
    [0.25, 0.08, 0.04, 0.025, 0.02, 0.015, 0.012, 0.01, 0.008, 0.006],
]

DEFAULT_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4],
    [2, 0], [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8],
    [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0],
    [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0],
    [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2],
    [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0],
    [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0],
]

SPARSE_7 = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]

SPARSE_15 = [
    [0], [1], [2], [3], [4],
    [0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [2, 0],
    [0, 0, 0], [0, 0, 1], [0, 1, 0],
    [0, 0, 0, 0],
]

SPARSE_31 = [
    [0], [1], [2], [3], [4], [5], [6], [7], [8], [9],
    [0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [0, 6], [1, 0], [1, 1], [2, 0], [3, 0],
    [4, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0],
    [0, 0, 0, 0],
]

PRESETS = {
    "default-63": DEFAULT_63,
    "sparse-31": SPARSE_31,
    "sparse-15": SPARSE_15,
    "sparse-7": SPARSE_7,
}
