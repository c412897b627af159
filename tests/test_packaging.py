"""The package finds its properties/ folder from an installed wheel, not only from a checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_properties_and_finds_them(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("recbole_llm-*.whl")
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    assert (unpacked / "recbole_llm" / "properties" / "overall.yaml").is_file()
    code = "from recbole_llm.config import properties_dir; print(properties_dir())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(unpacked), "PATH": ""},
    ).stdout.strip()
    assert out == str(unpacked / "recbole_llm" / "properties")
