"""pruning.distill: the Distillation objective against a hand computation, and a NeST run
that distils from its post-growth network (the teacher is that network, resume is exact)."""

import math

import pytest
import torch
import torch.nn.functional as F

from nestsynth.training import Distillation, train_epoch


class _Fixed(torch.nn.Module):
    """A 'teacher' that returns fixed logits for the rows it is given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits[: len(x)]


def _by_hand(s, t, y, alpha, T):
    out = []
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist()):
        zs = sum(math.exp(v / T) for v in si)
        zt = sum(math.exp(v / T) for v in ti)
        ps = [math.exp(v / T) / zs for v in si]
        pt = [math.exp(v / T) / zt for v in ti]
        kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
        ce = -(si[yi] - math.log(sum(math.exp(v) for v in si)))
        out.append((1 - alpha) * ce + alpha * T * T * kl)
    return out


@pytest.mark.parametrize("alpha,T", [(0.0, 4.0), (0.5, 4.0), (1.0, 2.0), (0.3, 1.0)])
def test_distillation_loss_by_hand(alpha, T):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 1, 2, 3])
    d = Distillation(_Fixed(t).double(), alpha, T)
    x = torch.zeros(5, 1, dtype=torch.float64)
    want = _by_hand(s, t, y, alpha, T)
    assert d(s, x, y).item() == pytest.approx(sum(want) / 5, rel=1e-10)
    assert d(s, x, y, "sum").item() == pytest.approx(sum(want), rel=1e-10)
    if alpha == 0:
        assert d(s, x, y).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-12)


def test_teacher_is_frozen_and_a_student_equal_to_it_gets_only_the_label_gradient():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 3, generator=g)
    teacher = _Fixed(t)
    d = Distillation(teacher, 1.0, 3.0)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    s = t.clone().requires_grad_(True)
    d(s, torch.zeros(6, 1), torch.zeros(6, dtype=torch.long)).backward()
    assert torch.allclose(s.grad, torch.zeros_like(s.grad), atol=1e-7)  # alpha = 1: KL at its minimum


def test_train_epoch_with_the_objective_trains_on_it():
    """alpha = 1 towards a teacher that is the student's own initial copy changes nothing
    (zero gradient); the same epoch on the labels moves the weights."""
    import copy

    torch.manual_seed(0)
    X, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    student = torch.nn.Linear(8, 3)
    start = copy.deepcopy(student.state_dict())
    d = Distillation(copy.deepcopy(student), 1.0, 2.0)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    train_epoch(student, X, y, opt, 16, torch.Generator().manual_seed(0), objective=d)
    assert all(torch.allclose(student.state_dict()[k], start[k], atol=1e-6) for k in start)
    train_epoch(student, X, y, opt, 16, torch.Generator().manual_seed(0))
    assert not torch.allclose(student.weight, start["weight"])


def _cfg(**pruning):
    from test_size_target import _l0_cfg

    return _l0_cfg(distill=0.5, **pruning)


def test_nest_distils_from_its_post_growth_network(digits):
    from nestsynth.api import resolve_reference
    from nestsynth.run_context import RunContext
    from nestsynth.synthesis import Synthesis

    cfg = _cfg()
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    seen = []
    original = syn.ctx.train

    def spy(model, epochs, **options):
        seen.append((syn.state.phase, options.get("objective")))
        return original(model, epochs, **options)

    syn.ctx.train = spy
    grown = {}
    enter = syn._enter_pruning

    def at_the_end_of_growth(val):  # the oracle: the network as growth leaves it
        grown.update({k: v.detach().clone() for k, v in syn.model.state_dict().items()})
        return enter(val)

    syn._enter_pruning = at_the_end_of_growth
    model = syn.run()
    assert sum(layer.active_connections() for layer in model.layers) == 600
    phases = {phase for phase, _ in seen}
    assert {"growth", "pruning", "finetune"} <= phases
    assert all((obj is None) == (phase == "growth") for phase, obj in seen)
    teacher = syn._distill.teacher
    state = teacher.state_dict()
    assert grown and state.keys() == grown.keys() and all(torch.equal(state[k], grown[k]) for k in grown)
    assert teacher.active_weights() == syn.state.weights["post_growth"] > 600
    assert not any(torch.equal(state[k], v) for k, v in model.state_dict().items() if k.endswith("weight"))


def test_distilled_resume_is_exact(digits, tmp_path):
    from nestsynth.api import resolve_reference
    from nestsynth.baselines.runner import run_method
    from nest_helpers import interrupt_after

    cfg = _cfg()
    ref = resolve_reference(cfg.model, digits)
    model_a, _ = run_method(cfg, digits, ref, tmp_path / "A")
    with pytest.raises(KeyboardInterrupt):  # interrupted among the gated iterations
        run_method(cfg, digits, ref, tmp_path / "B", on_iteration=interrupt_after(5))
    model_b, _ = run_method(cfg, digits, ref, tmp_path / "B", resume=True)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_distill_values_are_checked():
    from nestsynth.config import from_dict, validate
    from nestsynth.errors import NestError

    with pytest.raises(NestError, match="pruning.distill"):
        validate(from_dict({"pruning": {"distill": 1.5}}))
    with pytest.raises(NestError, match="distill_temperature"):
        validate(from_dict({"pruning": {"distill_temperature": 0}}))
