"""`run --save-video` keeps every answered frame, whatever the mix of image sizes in the folder."""

from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from edgeexit.cli import app


def test_save_video_keeps_frames_of_other_sizes(tiny_artifact, test_frames, tmp_path):
    import cv2

    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = [(28, 28), (56, 40), (28, 28), (90, 60), (33, 47)]
    for i, (w, h) in enumerate(sizes):
        img = Image.fromarray(test_frames[0][i][:, :, 0]).resize((w, h))
        img.save(folder / f"{i}.png")
    out = tmp_path / "out.mp4"
    res = CliRunner().invoke(app, ["run", str(tiny_artifact), "--source", str(folder), "--quiet", "--no-drift",
                                   "--save-video", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "resized to it" in res.output
    cap = cv2.VideoCapture(str(out))
    shapes = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        shapes.append(frame.shape[:2])
    cap.release()
    assert len(shapes) == len(sizes)  # OpenCV's writer alone would have dropped the three of other sizes
    assert set(shapes) == {(28, 28)}  # the first frame's size
