"""Backbone exports: each format is loaded back with its own reader and gives the backbone's output."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torchvision

from orl.checkpoint import EXPORT_FORMATS, ExportError, export_backbone, load_model
from orl.cli import build_parser, main


@pytest.fixture(scope="module")
def backbone(tiny_byol_checkpoint):
    model, cfg, _ = load_model(tiny_byol_checkpoint)
    return model.backbone.eval(), cfg


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # the traced size (64 px, batch 1), and another batch and size: the exports are not fixed to either
    return [torch.randn(1, 3, 64, 64, generator=g), torch.randn(3, 3, 96, 80, generator=g)]


def _want(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(x).numpy()


def test_torchvision_state_dict_loads_into_a_plain_resnet(tiny_byol_checkpoint, backbone, tmp_path):
    net, _ = backbone
    out = tmp_path / "backbone.pth"
    assert export_backbone(tiny_byol_checkpoint, out)["format"] == "torchvision"
    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    resnet.fc = torch.nn.Identity()
    resnet.eval()
    for x in _inputs():
        np.testing.assert_allclose(_want(resnet, x), _want(net, x), rtol=1e-5, atol=1e-5)


def test_torchscript_loads_without_orl(tiny_byol_checkpoint, backbone, tmp_path):
    net, cfg = backbone
    out = tmp_path / "backbone.ts"
    info = export_backbone(tiny_byol_checkpoint, out, "torchscript")
    assert info["traced_at"] == [1, 3, cfg.augment.image_size, cfg.augment.image_size] and info["output"] == ["N", 512]
    loaded = torch.jit.load(str(out))
    for x in _inputs():
        np.testing.assert_allclose(_want(loaded, x), _want(net, x), rtol=1e-5, atol=1e-5)


def test_onnx_runs_in_onnx_own_evaluator(tiny_byol_checkpoint, backbone, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    net, _ = backbone
    out = tmp_path / "backbone.onnx"
    assert export_backbone(tiny_byol_checkpoint, out, "onnx")["output"] == ["N", 512]
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["features"]
    runner = ReferenceEvaluator(model)  # onnx's own (numpy) implementation of every operator
    for x in _inputs():
        got = runner.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, _want(net, x), rtol=1e-4, atol=1e-4)


def test_export_errors_say_what_to_do(tiny_byol_checkpoint, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="torchvision, torchscript, onnx"):
        export_backbone(tiny_byol_checkpoint, tmp_path / "x", "tflite")
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if onnx were not installed
    with pytest.raises(ExportError, match="pip install onnx"):
        export_backbone(tiny_byol_checkpoint, tmp_path / "x.onnx", "onnx")
    assert main(["export-backbone", "--checkpoint", str(tiny_byol_checkpoint), "--out", str(tmp_path / "y.onnx"),
                 "--format", "onnx"]) == 2
    assert "pip install onnx" in capsys.readouterr().err and not (tmp_path / "y.onnx").exists()
    assert main(["export-backbone", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "z"),
                 "--format", "torchscript"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export-backbone", "--checkpoint", str(tiny_byol_checkpoint), "--out", str(tmp_path / "z"),
                 "--format", "torchscript", "--input-size", "8"]) == 2
    assert "--input-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["export-backbone", "--checkpoint", "c", "--out", "o", "--format", "tflite"])
    assert exc.value.code == 2


def test_cli_writes_each_format(tiny_byol_checkpoint, tmp_path, capsys):
    for fmt in EXPORT_FORMATS:  # the CLI offers every format the library writes
        assert build_parser().parse_args(["export-backbone", "--checkpoint", "c", "--out", "o",
                                          "--format", fmt]).format == fmt
    for fmt in ("torchvision", "torchscript"):
        out = tmp_path / f"b.{fmt}"
        assert main(["export-backbone", "--checkpoint", str(tiny_byol_checkpoint), "--out", str(out),
                     "--format", fmt, "--quiet"]) == 0
        assert out.is_file() and f'"format": "{fmt}"' in capsys.readouterr().out
