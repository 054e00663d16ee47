"""Data-side review: each test checks one rule against a hand computation."""
import pytest
import torch

from vitaclip.data import sampling
from vitaclip.data.augment import FILL, apply_op
from vitaclip.engine.loader import ShardedTrainLoader


class Items:
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.zeros(1), torch.tensor(0), i


def epoch_order(seed, epoch):
    loader = ShardedTrainLoader(Items(), 40, 40, seed=seed)
    return [index for batch in loader._keys(epoch, 0) for index, _ in batch]


def test_the_data_orders_of_two_seeds_share_no_epoch():
    """The order was a permutation seeded by seed + epoch: the run of seed 1 saw, epoch by epoch, the
    orders the run of seed 0 saw one epoch later (replicate runs were not independent)."""
    orders = {(seed, epoch): epoch_order(seed, epoch) for seed in range(3) for epoch in range(3)}
    assert sorted(orders[0, 0]) == list(range(40))
    distinct = {tuple(order) for order in orders.values()}
    assert len(distinct) == len(orders)
    assert epoch_order(1, 0) == orders[1, 0]  # still a pure function of (seed, epoch)


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY"])
def test_geometric_ops_leave_no_grey_seam_along_the_frames_edges(name):
    """PIL (timm's ops) samples a pixel that maps inside the frame from the frame alone, its bicubic taps
    past the edge reading the edge pixels; outside, the grey fill. So a frame of one colour becomes that
    colour and grey only. Taps reading the fill blended grey into a seam of 1-2 pixels along the frame's
    edges (values between, up to 60 levels off)."""
    frame = torch.full((1, 3, 40, 56), 250.0)
    out = apply_op(name, frame, torch.tensor([10.0]), torch.tensor([1.0]))
    values = set(out.unique().tolist())
    assert values == {250.0, FILL}, sorted(values)


def test_eval_view_starts_round_the_exact_quotient_of_the_spec():
    """SPEC: view i starts at round(slack * i / (n - 1)) (Python's round: halves to even). slack / (n - 1) * i
    rounds slack / (n - 1) first: for 15 views of a slack of 29, view 7's 29 / 14 * 7 came to
    14.500000000000002, so 15 where the SPEC gives round(203 / 14) = round(14.5) = 14."""
    frames, num_frames, stride = 29 + 113, 8, 16  # a clip spans 113 frames: slack 29
    starts = sampling.eval_view_starts(frames, num_frames, stride, 15)
    assert starts[7] == 14
    assert starts == [round(29 * i / 14) for i in range(15)]
    assert starts[:3] == [0, 2, 4] and starts[-1] == 29  # 29 / 14 = 2.07..., 4.14...
