"""Pinned overrides: spec/overrides/<path> replaces src/<path> in every build; what may not be pinned is refused."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from generator.artifact.overrides import (
    MAX_OVERRIDE_BYTES,
    apply_overrides,
    load_overrides,
    override_additions,
    override_hashes,
)
from generator.errors import UserError
from generator.spec.load import load_spec

REPO = Path(__file__).resolve().parents[1]


def put(root: Path, rel: str, data: bytes) -> Path:
    path = root / "overrides" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_no_overrides_folder_means_none(tmp_path):
    assert load_overrides(tmp_path) == {}


def test_load_and_apply(tmp_path):
    put(tmp_path, "madgroup/mads/turing.py", b"# pinned\n")
    put(tmp_path, "deploy/extra.conf", b"extra\n")
    overrides = load_overrides(tmp_path, package="madgroup")
    assert overrides == {"deploy/extra.conf": b"extra\n", "madgroup/mads/turing.py": b"# pinned\n"}
    files = {"madgroup/mads/turing.py": "generated\n", "README.md": "readme\n"}
    result, pinned = apply_overrides(files, overrides)
    assert result == {"madgroup/mads/turing.py": b"# pinned\n", "README.md": "readme\n", "deploy/extra.conf": b"extra\n"}
    assert pinned == ["deploy/extra.conf", "madgroup/mads/turing.py"]
    assert files["madgroup/mads/turing.py"] == "generated\n", "the input is not changed"
    assert override_additions(files, overrides) == ["deploy/extra.conf"]
    assert override_hashes(overrides)["deploy/extra.conf"] == hashlib.sha256(b"extra\n").hexdigest()


def test_paths_escaping_src_are_refused():
    for bad in ("../evil.py", "a/../../evil.py", "/etc/passwd", "a//b", "./a", "a\\b"):
        with pytest.raises(UserError, match="overrides that cannot be applied"):
            apply_overrides({}, {bad: b"x"})


def test_a_symlink_is_refused_naming_it(tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_text("secret\n")
    spec = tmp_path / "spec"
    put(spec, "ok.txt", b"ok\n")
    os.symlink(outside, spec / "overrides" / "link.py")
    os.symlink(tmp_path, spec / "overrides" / "dir")
    with pytest.raises(UserError) as caught:
        load_overrides(spec)
    message = str(caught.value)
    assert "overrides/link.py" in message and "overrides/dir" in message and "symlink" in message


def test_kernel_lock_and_oversized_overrides_are_refused(tmp_path):
    put(tmp_path, "madgroup/kernel/bus.py", b"# mine\n")
    with pytest.raises(UserError, match=r"overrides/madgroup/kernel/bus\.py.*kernel"):
        load_overrides(tmp_path, package="madgroup")
    with pytest.raises(UserError, match="kernel"):
        load_overrides(tmp_path)  # without the package, any <x>/kernel/ is refused
    with pytest.raises(UserError, match="kernel"):
        apply_overrides({}, {"madgroup/kernel/bus.py": b""}, package="madgroup")
    shutil.rmtree(tmp_path / "overrides")
    put(tmp_path, "tests/harness.py", b"# mine\n")  # the test harness is regen's too, copied like the kernel
    with pytest.raises(UserError, match=r"overrides/tests/harness\.py.*test harness"):
        load_overrides(tmp_path, package="madgroup")
    shutil.rmtree(tmp_path / "overrides")
    put(tmp_path, "uv.lock", b"")
    put(tmp_path, "big.bin", b"x" * (MAX_OVERRIDE_BYTES + 1))
    with pytest.raises(UserError) as caught:
        load_overrides(tmp_path)
    assert "overrides/uv.lock" in str(caught.value) and "overrides/big.bin" in str(caught.value)
    assert "512 KiB" in str(caught.value)


def test_an_override_is_an_input_of_the_build(tmp_path):
    """load_spec reads every spec file, overrides/ included, so the fingerprint covers them."""
    spec = shutil.copytree(REPO / "spec", tmp_path / "spec")
    put(spec, "madgroup/mads/turing.py", b"# pinned\n")
    paths = [f.path for f in load_spec(spec).files]
    assert "overrides/madgroup/mads/turing.py" in paths
