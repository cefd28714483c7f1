"""Written files respect the umask (0644 under 022), also those written through a temporary file."""
from __future__ import annotations

import os
import stat

import pytest


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_shard_tars_and_safetensors_get_the_umask_mode(umask, tmp_path):
    from safetensors.torch import save_file
    import torch

    from storage.fs import apply_umask, current_umask, write_bytes_atomic
    from storage.shards import write_shard

    assert current_umask() == umask
    write_shard(str(tmp_path / "train-000000.tar"), [{"__key__": "a", "cls": 1}])
    write_bytes_atomic(str(tmp_path / "m.json"), b"{}")
    (tmp_path / "vae").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "vae" / "w.safetensors"))
    assert _mode(tmp_path / "vae" / "w.safetensors") == 0o600  # what safetensors does on its own
    apply_umask(str(tmp_path / "vae"))
    want = 0o666 & ~umask
    assert {_mode(p) for p in (tmp_path / "train-000000.tar", tmp_path / "m.json",
                               tmp_path / "vae" / "w.safetensors")} == {want}
