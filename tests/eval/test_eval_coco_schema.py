"""``clipkit eval retrieval`` on a COCO JSON of the wrong schema (issue 17): one line naming the
file and the missing key, exit 2, before the model is loaded (the model path here does not
exist, so reaching it would give another message)."""

from __future__ import annotations

import pytest

from clipkit.cli import main

CASES = [
    ('{"images": []}', "missing key 'annotations'"),
    ('{"images": [{"file_name": "a.jpg"}], "annotations": []}', "images[0] has no 'id' key"),
    (
        '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
        "annotations[0] has no 'caption' key",
    ),
    ('{"images": [], "annotations": []}', "'images' is empty"),
]


@pytest.mark.parametrize(("content", "needle"), CASES)
def test_wrong_coco_schema_is_one_line_before_the_model(tmp_path, capsys, content, needle):
    coco = tmp_path / "captions_val2017.json"
    coco.write_text(content)
    out = tmp_path / "r.json"
    args = ["eval", "retrieval", "--model", str(tmp_path / "no-model"), "--data", str(coco)]
    assert main([*args, "--output", str(out), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"clipkit eval retrieval: error: COCO captions file {coco}: {needle}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [coco.name]  # no result, no .tmp
