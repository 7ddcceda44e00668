"""The battery's own checks, fast enough for every run: each bug still applies to this tree (its search text is in
its file exactly once), a missing one fails loudly, and the list covers what it promises."""

import pytest

from tests.battery import harness
from tests.battery.bugs import BUGS

AREAS = (
    "quantization scale",
    "smoothing",
    "epilogue",
    "weight layout",
    "QKV fusion order",
    "scheduler timesteps",
    "scheduler sigmas",
    "guidance",
    "CFG batch order",
    "VAE scaling",
    "LoRA scale",
    "pooled text embeddings",
    "text conditioning",
    "micro-conditioning",
    "scheduler noise",
    "dtype downcast",
)


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_each_bug_applies_to_this_tree(bug):
    text = (harness.ROOT / bug.file).read_text()
    assert text.count(bug.search) == 1, f"{bug.name}: update its search text in tests/battery/bugs.py"
    assert bug.replace != bug.search


def test_the_battery_covers_every_area_with_at_least_12_bugs():
    assert len(BUGS) >= 12 and len({b.name for b in BUGS}) == len(BUGS)
    missing = [area for area in AREAS if not any(b.area.startswith(area) for b in BUGS)]
    assert not missing, f"no bug for {missing}"


def test_a_patch_whose_text_moved_fails_loudly(tmp_path):
    (tmp_path / "sdxl_core").mkdir()
    (tmp_path / BUGS[0].file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / BUGS[0].file).write_text("the code moved\n")
    with pytest.raises(harness.PatchMissing, match=f"bug {BUGS[0].name}: its search text is not found"):
        harness.apply(BUGS[0], tmp_path)


def test_the_copy_is_what_runs(tmp_path):
    """A copy of the repository imports its own sdxl_core (the check every battery run makes first)."""
    tree = harness.copy_repository(tmp_path / "copy")
    harness.check_imports_copy(tree)
    assert not (tree / "sdxl_core" / "__pycache__").exists()
