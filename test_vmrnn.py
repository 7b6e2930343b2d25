"""Tests for vmrnn: equivalence with the authors' code, invariants, shapes, errors.

Run: python -m pytest -q test_vmrnn.py   (CPU, a few minutes on 2 cores)
Tests that need ../shared (the authors' fixtures, real MNIST digits) skip with a reason without it.
"""

from pathlib import Path

import pytest
import torch

import vmrnn
from vmrnn import VMRNN_B, VMRNN_D, cross_merge, cross_scan, load_official_state_dict, paper_model

SHARED = Path(__file__).resolve().parent.parent / "shared"
FIXTURES = SHARED / "fixtures"
FIXTURE_NAMES = ["mmnist_b_small", "mmnist_d_small", "openstl_b_small"]


# --------------------------------------------------------------------------------------------------
# Model: equivalence with the authors' code (../shared/fixtures)
# --------------------------------------------------------------------------------------------------

def load_fixture(name):
    path = FIXTURES / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"{path} not found: the official fixtures live in ../shared beside the checkout")
    return torch.load(path, weights_only=True)


def model_from_fixture(fixture):
    """Build our model from a fixture's official constructor arguments."""
    cfg, variant = fixture["config"], fixture["variant"]
    if variant == "mmnist-B":
        (depth,) = cfg["depths"]
        return VMRNN_B(cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["embed_dim"],
                       depth=depth, drop_path_rate=cfg["drop_path_rate"])
    if variant == "mmnist-D":
        return VMRNN_D(cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["embed_dim"],
                       depths_down=cfg["depths_down"], depths_up=cfg["depths_up"])
    assert variant == "openstl-B"
    _, chans, h, w = cfg["in_shape"]
    return VMRNN_B((h, w), cfg["patch_size"], chans, cfg["embed_dim"], depth=cfg["depths"],
                   drop_path_rate=cfg["drop_path_rate"])


def first_cell(model):
    return model.cell if isinstance(model, VMRNN_B) else model.down[0]


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def official(request):
    fixture = load_fixture(request.param)
    model = model_from_fixture(fixture).eval()
    ignored = load_official_state_dict(model, fixture["state_dict"])
    return fixture, model, ignored


def test_official_rollout_matches(official):
    fixture, model, _ = official
    with torch.no_grad():
        out = model(fixture["inputs"], fixture["T_out"])
    assert out.shape == fixture["outputs"].shape
    assert (out - fixture["outputs"]).abs().max().item() <= 1e-5


def test_official_intermediates_match(official):
    """Each captured layer (frame step 1, non-zero state) matches, so a mismatch names its layer."""
    fixture, model, _ = official
    mods, cell = fixture["modules"], first_cell(model)
    grid = model.grid
    with torch.no_grad():
        ss2d = mods["first_ss2d"]
        out = cell.blocks[0].ss2d(ss2d["x"])
        assert out.shape == (ss2d["x"].shape[0], *grid, ss2d["x"].shape[-1])
        torch.testing.assert_close(out, ss2d["out"], rtol=0, atol=1e-5)

        vsb = mods["first_vsb"]
        torch.testing.assert_close(cell.blocks[0](vsb["x"], vsb["hx"]), vsb["out"], rtol=0, atol=1e-5)

        c = mods["first_cell"]
        h_state, (h_again, c_state) = cell(c["xt"], (c["hx"], c["cx"]))
        torch.testing.assert_close(h_state, c["Ht"], rtol=0, atol=1e-5)
        torch.testing.assert_close(c_state, c["Ct"], rtol=0, atol=1e-5)
        assert h_again is h_state


def test_official_ignored_keys_are_the_dead_weights(official):
    fixture, model, ignored = official
    assert ignored, "the authors' models always carry unused weights"
    for key in ignored:
        dead_linear = ".linear." in key and ".VSBs.0." not in key
        assert dead_linear or key.startswith("Upsample.patch_embed."), key
    # Everything else was loaded: one official weight per parameter of ours.
    assert len(fixture["state_dict"]) - len(ignored) == len(model.state_dict())


def test_official_loader_rejects_what_does_not_fit():
    fixture = load_fixture("mmnist_b_small")
    model = model_from_fixture(fixture)
    state = dict(fixture["state_dict"])
    with pytest.raises(ValueError, match="unexpected keys"):
        load_official_state_dict(model, {**state, "ST.extra.weight": torch.zeros(1)})
    key = "ST.patch_embed.proj.weight"
    with pytest.raises(ValueError, match="missing weights"):
        load_official_state_dict(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        load_official_state_dict(model, {**state, key: torch.zeros(3, 3)})
    wrong_depth = VMRNN_B(16, 2, 1, 32, depth=3)       # the fixture has 2 blocks
    with pytest.raises(ValueError, match="missing weights"):
        load_official_state_dict(wrong_depth, state)
    ddp_saved = {f"module.{k}": v for k, v in state.items()}
    assert len(load_official_state_dict(model, ddp_saved)) == 2


# --------------------------------------------------------------------------------------------------
# Model: invariants, shapes, parameters
# --------------------------------------------------------------------------------------------------

def test_cross_merge_undoes_cross_scan():
    x = torch.randn(2, 3, 4, 6)                            # (b, d, H, W), rectangular
    xs = cross_scan(x)                                     # (b, k, d, l)
    assert xs.shape == (2, 4, 3, 24)
    torch.testing.assert_close(xs[:, 0], x.flatten(2))                      # row-major
    torch.testing.assert_close(xs[:, 1, :, 5], x[:, :, 1, 1])               # column-major: l = w*H + h
    torch.testing.assert_close(xs[:, 2], xs[:, 0].flip(-1))
    torch.testing.assert_close(xs[:, 3], xs[:, 1].flip(-1))
    torch.testing.assert_close(cross_merge(xs, 4, 6), 4 * x.flatten(2))


@pytest.mark.parametrize("name, count", [("taxibj", 2_218_114), ("kth", 1_050_241),
                                         ("mmnist", 13_395_329)])
def test_paper_model_parameter_counts(name, count):
    """The authors' counts minus the weights their code never uses (SPEC §6)."""
    assert sum(p.numel() for p in paper_model(name).parameters()) == count


@pytest.mark.parametrize("make, size", [
    (lambda: VMRNN_B((16, 24), 2, 3, 16, depth=2), (16, 24)),
    (lambda: VMRNN_B(32, 4, 2, 16, depth=1), (32, 32)),
    (lambda: VMRNN_D((16, 32), 2, 1, 16, depths_down=(1, 1), depths_up=(1, 1)), (16, 32)),
])
def test_rollout_shapes(make, size):
    model = make().eval()
    frames = torch.rand(2, 3, model.in_chans, *size)
    with torch.no_grad():
        out = model(frames, pred_len=4)
    assert out.shape == (2, 3 - 1 + 4, model.in_chans, *size)
    assert out.min() > 0 and out.max() < 1


def test_step_by_step_equals_rollout():
    """Streaming frames through `step` with explicit state is the rollout, step for step."""
    model = VMRNN_D(16, 2, 1, 16, depths_down=(1, 1), depths_up=(1, 1)).eval()
    frames = torch.rand(1, 3, 1, 16, 16)
    with torch.no_grad():
        out = model(frames, pred_len=2)
        state, preds = None, []
        for t in range(3):
            pred, state = model.step(frames[:, t], state)
            preds.append(pred)
        assert len(state) == 4 and all(len(s) == 2 for s in state)
        preds.append(model.step(preds[-1], state)[0])
    torch.testing.assert_close(out, torch.stack(preds, 1))


@pytest.mark.parametrize("make", [
    lambda: VMRNN_B(16, 4, 2, 16, depth=2, drop_path_rate=0.0),
    lambda: VMRNN_D(16, 2, 1, 8, depths_down=(2, 1), depths_up=(1, 2), drop_path_rate=0.0),
])
def test_every_parameter_gets_a_gradient(make):
    model = make().train()
    frames = torch.rand(2, 4, model.in_chans, 16, 16)
    out = model(frames[:, :2], pred_len=2)
    torch.nn.functional.mse_loss(out, frames[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_paper_cell_differs_only_in_the_cell_update():
    torch.manual_seed(0)
    code = VMRNN_B(16, 2, 1, 16, depth=2, cell_update="code").eval()
    paper = VMRNN_B(16, 2, 1, 16, depth=2, cell_update="paper").eval()
    paper.load_state_dict(code.state_dict())              # same parameters, same names
    x, h, c = (torch.randn(2, 64, 16) for _ in range(3))
    with torch.no_grad():
        o = code.cell.blocks[1](code.cell.blocks[0](x, h))
        f = torch.sigmoid(o)
        _, (h_code, c_code) = code.cell(x, (h, c))
        _, (h_paper, c_paper) = paper.cell(x, (h, c))
    torch.testing.assert_close(c_code, f * (c + torch.tanh(o)))
    torch.testing.assert_close(c_paper, f * torch.tanh(o) + c)
    torch.testing.assert_close(h_code, f * torch.tanh(c_code))
    torch.testing.assert_close(h_paper, f * torch.tanh(c_paper))
    assert not torch.allclose(c_code, c_paper)


def test_drop_path_is_random_in_training_only():
    model = VMRNN_B(16, 2, 1, 16, depth=2, drop_path_rate=0.5)
    frames = torch.rand(4, 2, 1, 16, 16)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(frames, 1), model(frames, 1))
        model.train()
        torch.manual_seed(0)
        a = model(frames, 1)
        torch.manual_seed(1)
        assert not torch.allclose(a, model(frames, 1))


def test_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = VMRNN_B(16, 2, 1, 16, depth=1).eval()
    frames = torch.rand(2, 2, 1, 16, 16)
    with torch.no_grad():
        ref = model(frames, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(frames, 2)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("make, match", [
    (lambda: VMRNN_B(30, 4, 1, 16), "not divisible by patch_size 4"),
    (lambda: VMRNN_B(16, 3, 1, 16), "patch_size must be 2, 4 or 8"),
    (lambda: VMRNN_B(14, 2, 1, 16), "must be even"),
    (lambda: VMRNN_B(32, 4, 1, 24), "divisible by 16"),
    (lambda: VMRNN_D(24, 2, 1, 16, depths_down=(1, 1, 1), depths_up=(1, 1, 1)), "cannot be halved 3"),
    (lambda: VMRNN_D(32, 2, 1, 16, depths_down=(1, 1), depths_up=(1,)), "same number"),
    (lambda: VMRNN_B(16, 2, 1, 16, cell_update="eq5"), "cell_update"),
    (lambda: paper_model("moving-mnist"), "unknown paper model"),
])
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("shape", [(2, 3, 2, 16, 16), (2, 3, 1, 16, 24), (3, 1, 16, 16)])
def test_bad_frames_raise_clear_errors(shape):
    model = VMRNN_B(16, 2, 1, 16, depth=1)
    with pytest.raises(ValueError, match=r"expected frames of shape \(b, t, 1, 16, 16\)"):
        model(torch.rand(*shape), 1)


def test_unknown_keyword_raises():
    """No **kwargs pass-through: a misspelt argument is an error, not a silent default."""
    with pytest.raises(TypeError):
        VMRNN_B(16, 2, 1, 16, dept=2)
