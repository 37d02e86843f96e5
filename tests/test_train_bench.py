"""tools/bench_train.py runs end to end on tiny settings and writes the JSON it documents."""
import json
import subprocess
import sys

import pytest

from hpcgan import REPO_ROOT


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "bench_train.py"), "--out", str(out),
                        "--models", "wgan_gp_ac", "--precisions", "fp32", "--width", "8", "--batch", "8",
                        "--images", "48", "--warmup", "1", "--steps", "2", "--backend", "webdataset", "--repeats", "1"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    row = res["cpu"]["wgan_gp_ac/fp32"]
    for layout, ranks in (("1x2", 1), ("2x1", 2)):
        assert row[layout]["ranks"] == ranks and row[layout]["images_per_s"] > 0
        assert row[layout]["global_batch"] == 8 * ranks
    assert row["ddp_efficiency"] == pytest.approx(row["2x1"]["images_per_s"] / row["1x2"]["images_per_s"], rel=1e-2)
    assert isinstance(row["pass"], bool) and res["target_ddp_efficiency"] == 0.8
    assert res["cpu_loader"]["images_per_s"] > 0
    assert (res["gpu"] is None) == (not __import__("torch").cuda.is_available())
