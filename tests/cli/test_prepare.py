"""data/prepare.py as a process: the same bytes as in this process (nothing depends on
the process: hash seeds, say), and a range it refuses, with nothing written."""

from conftest import QUICK, assert_user_error, run


def test_world_is_the_same_in_every_process(world, tmp_path):
    run("data/prepare.py", f"--out_dir={tmp_path / 'w'}", *QUICK["data/prepare.py"])
    assert sorted(f.name for f in (tmp_path / "w").iterdir()) == sorted(
        f.name for f in world.iterdir())
    for f in sorted(world.iterdir()):
        if f.name != "meta.json":  # (it records the output folder)
            assert f.read_bytes() == (tmp_path / "w" / f.name).read_bytes(), f.name


def test_prepare_refuses_a_range_through_a_process(tmp_path):
    p = run("data/prepare.py", f"--out_dir={tmp_path / 'w'}", "--max_add=1", ok=False)
    assert_user_error(p, "--max_add=1: the range is too small")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the temporary folder
