"""`run` on a folder reads it by training's input rules (runtime.sources._image_files with
util.check_input_file): a FIFO or device named like an image is never opened, and it or an unusable
image is skipped with one line on stderr; 16-bit frames are scaled as training scales them."""

from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image

from edgeexit.runtime.sources import iter_frames


def test_a_folder_with_a_fifo_and_bad_images_yields_the_good_frames_without_blocking(tmp_path, capsys):
    Image.fromarray(np.full((6, 5, 3), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((6, 5), 40000, np.uint16)).save(tmp_path / "b16.png")  # 16-bit gray
    os.mkfifo(tmp_path / "c.png")
    (tmp_path / "d.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    Image.fromarray(np.zeros((4, 4), np.int32)).save(tmp_path / "e32.tif")  # 32-bit: refused, skipped
    t0 = time.perf_counter()
    frames, order = iter_frames(str(tmp_path))
    got = list(frames)
    assert time.perf_counter() - t0 < 5 and order == "RGB"
    assert [n for n, _ in got] == ["a.png", "b16.png"]
    assert int(got[0][1].mean()) == 90 and int(got[1][1].max()) == 40000 >> 8
    err = capsys.readouterr().err
    assert "c.png is a FIFO" in err and "skipped" in err and "d.png" in err and "e32.tif" in err
    assert len([line for line in err.splitlines() if line.startswith("skipped")]) == 3
